"""TPM2_MakeCredential in software: how a verifier learns that an AK and an EK share a TPM.

The node answers with TPM2_ActivateCredential (``client.py``). Pure: the controller runs this.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:
    # TPM credential protection mandates CFB, which cryptography 47 moved to "decrepit".
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - cryptography < 47
    from cryptography.hazmat.primitives.ciphers.modes import CFB

from agent.attest.tpm.algorithms import ALG_AES, ALG_CFB, cryptography_hash, digest_size
from agent.attest.tpm.wire import (
    ATTR_DECRYPT,
    ATTR_RESTRICTED,
    MAX_NAME_BYTES,
    RsaParameters,
    decode_public,
)
from agent.errors import AttestationError


@dataclass(frozen=True)
class Credential:
    """What TPM2_MakeCredential returns: TPMS_ID_OBJECT bytes and the EK-encrypted seed."""

    credential_blob: bytes
    encrypted_secret: bytes


def kdf_a(
    hash_alg: int, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int
) -> bytes:
    """KDFa: SP 800-108 counter-mode HMAC KDF as Part 1 "Key Derivation Function" specifies."""
    label = label if label.endswith(b"\0") else label + b"\0"
    output = bytearray()
    counter = 1
    while len(output) * 8 < bits:
        mac = crypto_hmac.HMAC(key, cryptography_hash(hash_alg))
        mac.update(
            struct.pack(">I", counter) + label + context_u + context_v + struct.pack(">I", bits)
        )
        output += mac.finalize()
        counter += 1
    return bytes(output[: (bits + 7) // 8])


def make_credential(ek_public: bytes, ak_name: bytes, secret: bytes) -> Credential:
    """Software TPM2_MakeCredential (Part 1 "Credential Protection").

    Wraps ``secret`` so that only the TPM holding the EK can recover it, and only by naming a
    loaded object whose Name is ``ak_name`` (TPM2_ActivateCredential): this is how a verifier
    learns that the AK and the EK live in the same TPM.

    Only RSA EKs with an AES-CFB symmetric scheme (the TCG default templates) are supported.
    """
    ek = decode_public(ek_public)
    if not isinstance(ek.parameters, RsaParameters):
        raise AttestationError("make_credential supports RSA endorsement keys only")
    symmetric = ek.parameters.symmetric
    if symmetric.algorithm != ALG_AES or symmetric.mode != ALG_CFB:
        raise AttestationError("endorsement key's symmetric scheme is not AES-CFB")
    if symmetric.key_bits not in (128, 192, 256):
        raise AttestationError(f"endorsement key's AES key size {symmetric.key_bits} is invalid")
    if not ek.object_attributes & ATTR_RESTRICTED or not ek.object_attributes & ATTR_DECRYPT:
        raise AttestationError("endorsement key is not a restricted decryption key")
    if not isinstance(ak_name, bytes) or not 2 < len(ak_name) <= MAX_NAME_BYTES:
        raise AttestationError("AK name must be a TPM Name (nameAlg || digest)")
    name_hash = ek.name_alg
    seed_size = digest_size(name_hash)
    if not isinstance(secret, bytes) or not 1 <= len(secret) <= seed_size:
        # Part 3 TPM2_MakeCredential: the credential may not be longer than the EK nameAlg digest.
        raise AttestationError(f"credential secret must be 1..{seed_size} bytes")
    key = ek.public_key()
    if not isinstance(key, rsa.RSAPublicKey):  # pragma: no cover - RsaParameters gives RSA keys
        raise AttestationError("endorsement key did not decode to an RSA key")
    seed = os.urandom(seed_size)
    # Part 1 Annex B "Secret Sharing" (RSA): the seed is OAEP-encrypted with the EK's nameAlg
    # and the label "IDENTITY".
    hash_factory = cryptography_hash(name_hash)
    oaep = padding.OAEP(mgf=padding.MGF1(hash_factory), algorithm=hash_factory, label=b"IDENTITY\0")
    try:
        encrypted_seed = key.encrypt(seed, oaep)
    except (ValueError, UnsupportedAlgorithm) as exc:
        # UnsupportedAlgorithm: a nameAlg the library hashes but not in OAEP (SHA3).
        raise AttestationError(f"cannot encrypt the seed to the endorsement key: {exc}") from exc
    symmetric_key = kdf_a(name_hash, seed, b"STORAGE", ak_name, b"", symmetric.key_bits)
    # Part 2 TPMS_ID_OBJECT: encIdentity is the whole TPM2B_DIGEST, size field included, in CFB
    # with a zero IV (Part 1 "Credential Protection").
    encryptor = Cipher(algorithms.AES(symmetric_key), CFB(b"\0" * 16)).encryptor()
    enc_identity = encryptor.update(struct.pack(">H", len(secret)) + secret) + encryptor.finalize()
    hmac_key = kdf_a(name_hash, seed, b"INTEGRITY", b"", b"", seed_size * 8)
    mac = crypto_hmac.HMAC(hmac_key, cryptography_hash(name_hash))
    mac.update(enc_identity + ak_name)
    integrity = mac.finalize()
    blob = struct.pack(">H", len(integrity)) + integrity + enc_identity
    return Credential(credential_blob=blob, encrypted_secret=encrypted_seed)
