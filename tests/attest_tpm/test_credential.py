"""Enrollment: software MakeCredential (as the controller does it) and TPM ActivateCredential."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.attest.tpm.client import TpmClient
from agent.attest.tpm.credential import kdf_a, make_credential
from agent.attest.tpm.keys import AttestationKey
from agent.attest.tpm.wire import decode_public
from agent.errors import AttestationError, QuoteError, TpmError


def test_secret_comes_back(tpm: TpmClient, ak: AttestationKey) -> None:
    secret = os.urandom(32)
    credential = make_credential(tpm.endorsement_key().public, ak.name, secret)
    recovered = tpm.activate_credential(ak, credential.credential_blob, credential.encrypted_secret)
    assert recovered == secret


def test_credential_for_another_ak_name_fails(tpm: TpmClient, ak: AttestationKey) -> None:
    other_name = ak.name[:2] + bytes(b ^ 0xFF for b in ak.name[2:])
    credential = make_credential(tpm.endorsement_key().public, other_name, b"secret")
    with pytest.raises(TpmError, match="TPM2_ActivateCredential"):
        tpm.activate_credential(ak, credential.credential_blob, credential.encrypted_secret)


def test_credential_for_another_ek_fails(tpm: TpmClient, ak: AttestationKey) -> None:
    # An EK-shaped public area around a key this TPM does not hold.
    ek = tpm.endorsement_key().public
    other = rsa.generate_private_key(65537, 2048).public_key().public_numbers().n
    foreign_ek = ek[:-256] + other.to_bytes(256, "big")
    credential = make_credential(foreign_ek, ak.name, b"secret")
    with pytest.raises(TpmError, match="TPM2_ActivateCredential"):
        tpm.activate_credential(ak, credential.credential_blob, credential.encrypted_secret)


def test_tampered_credential_fails(tpm: TpmClient, ak: AttestationKey) -> None:
    credential = make_credential(tpm.endorsement_key().public, ak.name, b"secret")
    blob = bytearray(credential.credential_blob)
    blob[-1] ^= 1
    with pytest.raises(TpmError, match="TPM2_ActivateCredential"):
        tpm.activate_credential(ak, bytes(blob), credential.encrypted_secret)
    with pytest.raises(TpmError, match="at most"):
        tpm.activate_credential(ak, bytes(200), credential.encrypted_secret)


def _with_attribute_cleared(public: bytes, bit: int) -> bytes:
    # TPM2B_PUBLIC: size(2) type(2) nameAlg(2) objectAttributes(4)
    edited = bytearray(public)
    attributes = struct.unpack(">I", edited[6:10])[0] & ~bit
    edited[6:10] = struct.pack(">I", attributes)
    return bytes(edited)


def test_make_credential_input_checks(tpm: TpmClient, ak: AttestationKey) -> None:
    ek = tpm.endorsement_key().public
    with pytest.raises(AttestationError, match=r"1\.\.32 bytes"):
        make_credential(ek, ak.name, bytes(33))
    with pytest.raises(AttestationError, match=r"1\.\.32 bytes"):
        make_credential(ek, ak.name, b"")
    with pytest.raises(AttestationError, match="TPM Name"):
        make_credential(ek, b"\x00", b"secret")
    if ak.algorithm == "ecc-p256":
        with pytest.raises(AttestationError, match="RSA endorsement keys only"):
            make_credential(ak.public, ak.name, b"x")
    else:
        with pytest.raises(AttestationError, match="AES-CFB"):
            make_credential(ak.public, ak.name, b"x")
    not_decrypting = _with_attribute_cleared(ek, 1 << 17)
    decode_public(not_decrypting)
    with pytest.raises(AttestationError, match="not a restricted decryption key"):
        make_credential(not_decrypting, ak.name, b"x")
    with pytest.raises(QuoteError):
        make_credential(b"\x00\x02\x00", ak.name, b"x")
    # A nameAlg the library hashes but will not use in OAEP (SHA3-512, TPM_ALG 0x0029): found
    # by tests/attest_tpm/test_decoder_fuzz.py, it raised the library's own exception.
    sha3 = ek[:4] + b"\x00\x29" + ek[6:]
    with pytest.raises(AttestationError, match="cannot encrypt the seed"):
        make_credential(sha3, ak.name, b"x")


def test_kdfa_known_answer() -> None:
    # One block of SP 800-108 counter mode with HMAC-SHA256, written out by hand.
    key, label, u, v = b"k" * 32, b"STORAGE", b"u", b"v"
    block = struct.pack(">I", 1) + label + b"\0" + u + v + struct.pack(">I", 128)
    expected = hmac.new(key, block, hashlib.sha256).digest()[:16]
    assert kdf_a(0x000B, key, label, u, v, 128) == expected
    assert len(kdf_a(0x000B, key, label, u, v, 512)) == 64
