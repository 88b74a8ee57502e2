"""The one registry of TPM algorithms for all of attest: algorithm IDs, curves and PCR banks.

Every module that meets a TPM_ALG_ID or a bank name ("sha256") takes it from here: the TPM
structure decoders and quote checks, the firmware event log and IMA parsers, the policy, the
evidence document and the verifier. Values are from the TCG Algorithm Registry and the TPM 2.0
Library specification Part 2 (TPM_ALG_ID, TPM_ECC_CURVE).

A :class:`HashAlgorithm` knows its bank name, TPM_ALG_ID, digest size and how to compute it:
with hashlib for log replay (fast on many small inputs), with ``cryptography`` for signatures,
HMAC and OAEP over TPM structures. Pure: no TPM, no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import QuoteError

# Part 2 TPM_ALG_ID (the ones attest meets)
ALG_RSA: Final = 0x0001
ALG_SHA1: Final = 0x0004
ALG_AES: Final = 0x0006
ALG_MGF1: Final = 0x0007
ALG_SHA256: Final = 0x000B
ALG_SHA384: Final = 0x000C
ALG_SHA512: Final = 0x000D
ALG_NULL: Final = 0x0010
ALG_SM3_256: Final = 0x0012
ALG_SM4: Final = 0x0013
ALG_RSASSA: Final = 0x0014
ALG_RSAES: Final = 0x0015
ALG_RSAPSS: Final = 0x0016
ALG_OAEP: Final = 0x0017
ALG_ECDSA: Final = 0x0018
ALG_ECDH: Final = 0x0019
ALG_ECDAA: Final = 0x001A
ALG_SM2: Final = 0x001B
ALG_ECSCHNORR: Final = 0x001C
ALG_ECMQV: Final = 0x001D
ALG_KDF1_SP800_56A: Final = 0x0020
ALG_KDF2: Final = 0x0021
ALG_KDF1_SP800_108: Final = 0x0022
ALG_ECC: Final = 0x0023
ALG_CAMELLIA: Final = 0x0026
ALG_SHA3_256: Final = 0x0027
ALG_SHA3_384: Final = 0x0028
ALG_SHA3_512: Final = 0x0029
ALG_CFB: Final = 0x0043

# Part 2 TPM_ECC_CURVE
ECC_NIST_P256: Final = 0x0003
ECC_NIST_P384: Final = 0x0004
ECC_NIST_P521: Final = 0x0005

#: The curves the verifier can check keys on: the ``cryptography`` curve and its field size.
ECC_CURVES: Final[Mapping[int, tuple[type[ec.EllipticCurve], int]]] = {
    ECC_NIST_P256: (ec.SECP256R1, 32),
    ECC_NIST_P384: (ec.SECP384R1, 48),
    ECC_NIST_P521: (ec.SECP521R1, 66),
}

#: sizeof(TPMU_HA): no TPM digest is longer (SHA-512).
MAX_DIGEST_BYTES: Final = 64
#: PC Client TPMs have 24 PCRs in every bank (PC Client Platform TPM Profile, PCR attributes).
PCR_COUNT: Final = 24


@dataclass(frozen=True)
class HashAlgorithm:
    """A TPM hash algorithm, which is also a PCR bank of the same name."""

    name: str
    algorithm_id: int
    digest_size: int
    hashlib_name: str
    # For signatures, HMAC and OAEP over TPM structures; None: TPM structures naming this
    # algorithm are refused (see SM3 below), though logs still replay its bank.
    cryptography_class: type[hashes.HashAlgorithm] | None

    def digest(self, data: bytes) -> bytes:
        try:
            return hashlib.new(self.hashlib_name, data).digest()
        except ValueError:
            # OpenSSL 3 builds without the legacy/SM providers lack SM3 in hashlib;
            # cryptography bundles its own OpenSSL that has it.
            if self.name != "sm3_256":
                raise
            context = hashes.Hash(hashes.SM3())
            context.update(data)
            return context.finalize()

    def extend(self, current: bytes, digest: bytes) -> bytes:
        """TPM2_PCR_Extend: new = H(current || digest)."""
        return self.digest(current + digest)


# TCG Algorithm Registry, TPM_ALG_ID values. SM3 keys, signatures and pcrDigests are refused by
# the quote checks and MakeCredential (cryptography has no SM2 to verify them with), as they
# always were; accepting them would widen what the verifier trusts.
BANKS: Final[Mapping[str, HashAlgorithm]] = {
    algorithm.name: algorithm
    for algorithm in (
        HashAlgorithm("sha1", ALG_SHA1, 20, "sha1", hashes.SHA1),
        HashAlgorithm("sha256", ALG_SHA256, 32, "sha256", hashes.SHA256),
        HashAlgorithm("sha384", ALG_SHA384, 48, "sha384", hashes.SHA384),
        HashAlgorithm("sha512", ALG_SHA512, 64, "sha512", hashes.SHA512),
        HashAlgorithm("sm3_256", ALG_SM3_256, 32, "sm3", None),
        HashAlgorithm("sha3_256", ALG_SHA3_256, 32, "sha3_256", hashes.SHA3_256),
        HashAlgorithm("sha3_384", ALG_SHA3_384, 48, "sha3_384", hashes.SHA3_384),
        HashAlgorithm("sha3_512", ALG_SHA3_512, 64, "sha3_512", hashes.SHA3_512),
    )
}
BANKS_BY_ALGORITHM_ID: Final[Mapping[int, HashAlgorithm]] = {
    algorithm.algorithm_id: algorithm for algorithm in BANKS.values()
}


def bank_name(algorithm_id: int) -> str:
    """The PCR bank name ("sha256") of a TPM_ALG_ID, or ``alg_0x....`` for an unknown one."""
    known = BANKS_BY_ALGORITHM_ID.get(algorithm_id)
    return known.name if known else f"alg_0x{algorithm_id:04x}"


def hash_algorithm_id(bank: str) -> int:
    """The TPM_ALG_ID of a bank name such as "sha256"; QuoteError for an unknown name."""
    known = BANKS.get(bank)
    if known is None:
        names = ", ".join(sorted(BANKS))
        raise QuoteError(f"unknown PCR bank {bank!r}: expected one of {names}")
    return known.algorithm_id


def digest_size(algorithm_id: int) -> int:
    """Digest size in bytes of a TPM hash algorithm; QuoteError if unknown."""
    known = BANKS_BY_ALGORITHM_ID.get(algorithm_id)
    if known is None:
        raise QuoteError(f"unknown hash algorithm 0x{algorithm_id:04x}")
    return known.digest_size


def cryptography_hash(algorithm_id: int) -> hashes.HashAlgorithm:
    """A ``cryptography`` hash for TPM structures; QuoteError if the verifier refuses it."""
    known = BANKS_BY_ALGORITHM_ID.get(algorithm_id)
    if known is None or known.cryptography_class is None:
        raise QuoteError(
            f"hash algorithm {bank_name(algorithm_id)} is not supported by this verifier"
        )
    return known.cryptography_class()


def hash_bytes(algorithm_id: int, data: bytes) -> bytes:
    """H_alg(data) over a TPM structure; QuoteError if the verifier refuses the algorithm."""
    digest = hashes.Hash(cryptography_hash(algorithm_id))
    digest.update(data)
    return digest.finalize()


def initial_pcr_value(bank: HashAlgorithm, pcr: int) -> bytes:
    """A PCR's value after TPM2_Startup when no StartupLocality event says otherwise.

    PC Client TPMs start PCRs 17-22 (the DRTM PCRs) at all ones until a dynamic launch resets
    them; every other PCR starts at zero (PC Client Platform TPM Profile, PCR attributes).
    """
    fill = b"\xff" if 17 <= pcr <= 22 else b"\x00"
    return fill * bank.digest_size
