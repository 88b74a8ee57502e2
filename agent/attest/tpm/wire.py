"""Decode and check TPM 2.0 quotes, signatures and public areas; make credentials for enrollment.

Everything here is pure (no TPM, no I/O) because the controller runs it on evidence that arrived
over the network: every decoder treats its input as hostile, bounds every length and count, and
raises only :class:`~agent.errors.QuoteError` whatever the bytes are. Structure layouts and
constants are from the TPM 2.0 Library specification (Part 1 "Architecture", Part 2 "Structures",
Part 3 "Commands"); comments name the structure or command a rule comes from.
"""

from __future__ import annotations

import hmac as stdlib_hmac
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:
    # TPM credential protection mandates CFB, which cryptography 47 moved to "decrepit".
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - cryptography < 47
    from cryptography.hazmat.primitives.ciphers.modes import CFB

from agent.errors import AttestationError, QuoteError

# Part 2 TPM_GENERATED: a restricted signing key only signs data the TPM produced itself
# when the data starts with this value, which is what makes a quote unforgeable.
TPM_GENERATED_VALUE: Final = 0xFF544347
# Part 2 TPM_ST
TPM_ST_ATTEST_QUOTE: Final = 0x8018

# Part 2 TPM_ALG_ID (the ones this module meets)
ALG_RSA: Final = 0x0001
ALG_SHA1: Final = 0x0004
ALG_AES: Final = 0x0006
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
ALG_MGF1: Final = 0x0007
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

# Part 2 TPMA_OBJECT bits
ATTR_FIXED_TPM: Final = 1 << 1
ATTR_FIXED_PARENT: Final = 1 << 4
ATTR_SENSITIVE_DATA_ORIGIN: Final = 1 << 5
ATTR_USER_WITH_AUTH: Final = 1 << 6
ATTR_RESTRICTED: Final = 1 << 16
ATTR_DECRYPT: Final = 1 << 17
ATTR_SIGN: Final = 1 << 18

#: The attributes accelguard creates its attestation key with, and the only ones it has.
AK_ATTRIBUTES: Final = (
    ATTR_RESTRICTED
    | ATTR_SIGN
    | ATTR_FIXED_TPM
    | ATTR_FIXED_PARENT
    | ATTR_SENSITIVE_DATA_ORIGIN
    | ATTR_USER_WITH_AUTH
)

# Bounds from Part 2 for an implementation that supports SHA-512, RSA-4096 and P-521; anything
# longer cannot have come from a TPM. Whole-structure limits stop us reading megabytes of junk.
_MAX_DIGEST: Final = 64  # sizeof(TPMU_HA)
_MAX_NAME: Final = 2 + _MAX_DIGEST  # sizeof(TPMU_NAME): a TPMT_HA
_MAX_DATA: Final = 2 + _MAX_DIGEST  # TPM2B_DATA is sizeof(TPMT_HA)
_MAX_RSA_KEY_BYTES: Final = 512
_MAX_ECC_KEY_BYTES: Final = 128
_MAX_PCR_BANKS: Final = 16  # HASH_COUNT, with room to spare
_MAX_PCR_SELECT_BYTES: Final = 4  # PCR_SELECT_MAX in tpm2-tss: 32 PCRs
MAX_PCR_INDEX: Final = _MAX_PCR_SELECT_BYTES * 8 - 1
_MAX_STRUCTURE: Final = 4096


@dataclass(frozen=True)
class _HashAlgorithm:
    bank: str
    digest_size: int
    factory: type[hashes.HashAlgorithm] | None  # None: cryptography cannot compute it (SM3)


_HASHES: Final[dict[int, _HashAlgorithm]] = {
    ALG_SHA1: _HashAlgorithm("sha1", 20, hashes.SHA1),
    ALG_SHA256: _HashAlgorithm("sha256", 32, hashes.SHA256),
    ALG_SHA384: _HashAlgorithm("sha384", 48, hashes.SHA384),
    ALG_SHA512: _HashAlgorithm("sha512", 64, hashes.SHA512),
    ALG_SM3_256: _HashAlgorithm("sm3_256", 32, None),
    ALG_SHA3_256: _HashAlgorithm("sha3_256", 32, hashes.SHA3_256),
    ALG_SHA3_384: _HashAlgorithm("sha3_384", 48, hashes.SHA3_384),
    ALG_SHA3_512: _HashAlgorithm("sha3_512", 64, hashes.SHA3_512),
}
_BANK_TO_ALG: Final[dict[str, int]] = {h.bank: alg for alg, h in _HASHES.items()}

_CURVES: Final[dict[int, tuple[type[ec.EllipticCurve], int]]] = {
    ECC_NIST_P256: (ec.SECP256R1, 32),
    ECC_NIST_P384: (ec.SECP384R1, 48),
    ECC_NIST_P521: (ec.SECP521R1, 66),
}


def bank_name(hash_alg: int) -> str:
    """The PCR bank name ("sha256") of a TPM_ALG_ID, or its number for unknown algorithms."""
    known = _HASHES.get(hash_alg)
    return known.bank if known else f"alg_0x{hash_alg:04x}"


def hash_algorithm_id(bank: str) -> int:
    """The TPM_ALG_ID of a bank name such as "sha256"; QuoteError for an unknown name."""
    try:
        return _BANK_TO_ALG[bank]
    except KeyError:
        known = ", ".join(sorted(_BANK_TO_ALG))
        raise QuoteError(f"unknown PCR bank {bank!r}: expected one of {known}") from None


def digest_size(hash_alg: int) -> int:
    """Digest size in bytes of a TPM hash algorithm; QuoteError if unknown."""
    known = _HASHES.get(hash_alg)
    if known is None:
        raise QuoteError(f"unknown hash algorithm 0x{hash_alg:04x}")
    return known.digest_size


def _hash_factory(hash_alg: int) -> hashes.HashAlgorithm:
    known = _HASHES.get(hash_alg)
    if known is None or known.factory is None:
        raise QuoteError(f"hash algorithm {bank_name(hash_alg)} is not supported by this verifier")
    return known.factory()


def hash_bytes(hash_alg: int, data: bytes) -> bytes:
    """H_alg(data) for a TPM hash algorithm id; QuoteError if unsupported."""
    digest = hashes.Hash(_hash_factory(hash_alg))
    digest.update(data)
    return digest.finalize()


class _Reader:
    """A bounds-checked cursor over TPM marshalling: big-endian, unpadded, TPM2B size-prefixed."""

    def __init__(self, data: bytes, structure: str) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise QuoteError(f"{structure}: expected bytes, got {type(data).__name__}")
        self._data = bytes(data)
        self._offset = 0
        self._structure = structure
        if len(self._data) > _MAX_STRUCTURE:
            raise QuoteError(
                f"{structure}: {len(self._data)} bytes is larger than any TPM produces "
                f"(limit {_MAX_STRUCTURE})"
            )

    def fail(self, what: str) -> QuoteError:
        return QuoteError(f"{self._structure}: {what} at byte offset {self._offset}")

    def take(self, count: int, what: str) -> bytes:
        end = self._offset + count
        if end > len(self._data):
            raise self.fail(f"truncated {what} (needs {count} bytes, {self.remaining} left)")
        chunk = self._data[self._offset : end]
        self._offset = end
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        value: int = struct.unpack(">H", self.take(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = struct.unpack(">I", self.take(4, what))[0]
        return value

    def u64(self, what: str) -> int:
        value: int = struct.unpack(">Q", self.take(8, what))[0]
        return value

    def sized(self, limit: int, what: str) -> bytes:
        """A TPM2B: UINT16 size then that many bytes, with the size bounded by the type's union."""
        size = self.u16(f"{what} size")
        if size > limit:
            raise self.fail(f"{what} size {size} exceeds the maximum {limit}")
        return self.take(size, what)

    @property
    def remaining(self) -> int:
        return len(self._data) - self._offset

    @property
    def offset(self) -> int:
        return self._offset

    def rest(self) -> bytes:
        return self.take(self.remaining, "remainder")

    def done(self) -> None:
        if self.remaining:
            raise self.fail(f"{self.remaining} trailing bytes after the structure")


# --- TPMS_ATTEST ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClockInfo:
    """TPMS_CLOCK_INFO (Part 2)."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True)
class PcrBankSelection:
    """One TPMS_PCR_SELECTION: a hash algorithm and the PCR indices selected in it, ascending."""

    hash_alg: int
    pcrs: tuple[int, ...]

    @property
    def bank(self) -> str:
        return bank_name(self.hash_alg)


@dataclass(frozen=True)
class QuoteInfo:
    """TPMS_QUOTE_INFO (Part 2)."""

    selection: tuple[PcrBankSelection, ...]
    pcr_digest: bytes

    def selection_dict(self) -> dict[str, list[int]]:
        """The selection as {bank: [indices]}; a bank listed twice merges (the check flags it)."""
        merged: dict[str, list[int]] = {}
        for entry in self.selection:
            merged.setdefault(entry.bank, []).extend(entry.pcrs)
        return {bank: sorted(set(pcrs)) for bank, pcrs in merged.items() if pcrs}


@dataclass(frozen=True)
class Attest:
    """TPMS_ATTEST (Part 2). ``quote_info`` is set when ``type`` is a quote."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    attested: bytes
    quote_info: QuoteInfo | None


def _read_pcr_selection(reader: _Reader) -> tuple[PcrBankSelection, ...]:
    count = reader.u32("TPML_PCR_SELECTION count")
    if count > _MAX_PCR_BANKS:
        raise reader.fail(f"TPML_PCR_SELECTION count {count} exceeds {_MAX_PCR_BANKS}")
    banks = []
    for _ in range(count):
        hash_alg = reader.u16("TPMS_PCR_SELECTION hash")
        size = reader.u8("TPMS_PCR_SELECTION sizeofSelect")
        if size > _MAX_PCR_SELECT_BYTES:
            raise reader.fail(f"sizeofSelect {size} exceeds {_MAX_PCR_SELECT_BYTES}")
        bitmap = reader.take(size, "pcrSelect")
        # Part 2 TPMS_PCR_SELECTION: bit j of octet i selects PCR 8*i + j.
        pcrs = tuple(
            8 * octet + bit for octet in range(size) for bit in range(8) if bitmap[octet] >> bit & 1
        )
        banks.append(PcrBankSelection(hash_alg, pcrs))
    return tuple(banks)


def _read_quote_info(reader: _Reader) -> QuoteInfo:
    selection = _read_pcr_selection(reader)
    pcr_digest = reader.sized(_MAX_DIGEST, "pcrDigest")
    return QuoteInfo(selection, pcr_digest)


def decode_quote_info(data: bytes) -> QuoteInfo:
    """Decode a marshalled TPMS_QUOTE_INFO; QuoteError on anything malformed."""
    reader = _Reader(data, "TPMS_QUOTE_INFO")
    info = _read_quote_info(reader)
    reader.done()
    return info


def decode_attest(data: bytes) -> Attest:
    """Decode TPMS_ATTEST (the contents of a TPM2B_ATTEST); QuoteError on anything malformed.

    Values are decoded, not judged: a wrong magic or type decodes fine and is reported by
    :func:`verify_quote`. The body is decoded as TPMS_QUOTE_INFO only when ``type`` says quote.
    """
    reader = _Reader(data, "TPMS_ATTEST")
    magic = reader.u32("magic")
    attest_type = reader.u16("type")
    qualified_signer = reader.sized(_MAX_NAME, "qualifiedSigner")
    extra_data = reader.sized(_MAX_DATA, "extraData")
    clock = reader.u64("clockInfo.clock")
    reset_count = reader.u32("clockInfo.resetCount")
    restart_count = reader.u32("clockInfo.restartCount")
    safe = reader.u8("clockInfo.safe")
    if safe not in (0, 1):
        raise reader.fail(f"clockInfo.safe is {safe}, a TPMI_YES_NO must be 0 or 1")
    firmware_version = reader.u64("firmwareVersion")
    body_offset = reader.offset
    attested = reader.rest()
    quote_info = None
    if attest_type == TPM_ST_ATTEST_QUOTE:
        body = _Reader(attested, f"TPMS_ATTEST quote body at offset {body_offset}")
        quote_info = _read_quote_info(body)
        body.done()
    return Attest(
        magic=magic,
        type=attest_type,
        qualified_signer=qualified_signer,
        extra_data=extra_data,
        clock_info=ClockInfo(clock, reset_count, restart_count, bool(safe)),
        firmware_version=firmware_version,
        attested=attested,
        quote_info=quote_info,
    )


# --- TPMT_SIGNATURE ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RsaSignature:
    """TPMS_SIGNATURE_RSA under TPM_ALG_RSASSA or TPM_ALG_RSAPSS."""

    scheme: int
    hash_alg: int
    signature: bytes


@dataclass(frozen=True)
class EcdsaSignature:
    """TPMS_SIGNATURE_ECDSA."""

    hash_alg: int
    r: int
    s: int

    @property
    def scheme(self) -> int:
        return ALG_ECDSA


Signature = RsaSignature | EcdsaSignature


def decode_signature(data: bytes) -> Signature:
    """Decode TPMT_SIGNATURE (Part 2) for RSASSA, RSAPSS and ECDSA; QuoteError otherwise."""
    reader = _Reader(data, "TPMT_SIGNATURE")
    scheme = reader.u16("sigAlg")
    result: Signature
    if scheme in (ALG_RSASSA, ALG_RSAPSS):
        hash_alg = reader.u16("hash")
        value = reader.sized(_MAX_RSA_KEY_BYTES, "RSA signature")
        result = RsaSignature(scheme, hash_alg, value)
    elif scheme == ALG_ECDSA:
        hash_alg = reader.u16("hash")
        r = reader.sized(_MAX_ECC_KEY_BYTES, "signatureR")
        s = reader.sized(_MAX_ECC_KEY_BYTES, "signatureS")
        result = EcdsaSignature(hash_alg, int.from_bytes(r, "big"), int.from_bytes(s, "big"))
    else:
        raise reader.fail(
            f"signature scheme 0x{scheme:04x} is not supported (expected RSASSA, RSAPSS or ECDSA)"
        )
    reader.done()
    return result


# --- TPM2B_PUBLIC -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SymmetricDefinition:
    """TPMT_SYM_DEF_OBJECT; ``key_bits`` and ``mode`` are 0 when ``algorithm`` is NULL."""

    algorithm: int
    key_bits: int = 0
    mode: int = 0


@dataclass(frozen=True)
class RsaParameters:
    """TPMS_RSA_PARMS plus the modulus from ``unique``."""

    symmetric: SymmetricDefinition
    scheme: int
    scheme_hash: int
    key_bits: int
    exponent: int
    modulus: bytes


@dataclass(frozen=True)
class EccParameters:
    """TPMS_ECC_PARMS plus the point from ``unique``."""

    symmetric: SymmetricDefinition
    scheme: int
    scheme_hash: int
    curve_id: int
    kdf_scheme: int
    kdf_hash: int
    x: bytes
    y: bytes


@dataclass(frozen=True)
class PublicArea:
    """TPMT_PUBLIC (Part 2) of an RSA or ECC key, with its canonical encoding."""

    type: int
    name_alg: int
    object_attributes: int
    auth_policy: bytes
    parameters: RsaParameters | EccParameters
    encoded: bytes = field(repr=False)

    @property
    def scheme(self) -> int:
        return self.parameters.scheme

    @property
    def scheme_hash(self) -> int:
        return self.parameters.scheme_hash

    @property
    def name(self) -> bytes:
        """Part 1 "Names": Name = nameAlg || H_nameAlg(TPMT_PUBLIC)."""
        return struct.pack(">H", self.name_alg) + hash_bytes(self.name_alg, self.encoded)

    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        """The key as a ``cryptography`` object; QuoteError if the numbers are not a valid key."""
        params = self.parameters
        try:
            if isinstance(params, RsaParameters):
                # Part 2 TPMS_RSA_PARMS: an exponent of zero means the default, 2^16 + 1.
                exponent = params.exponent or 65537
                if len(params.modulus) * 8 != params.key_bits:
                    raise QuoteError(
                        f"RSA modulus is {len(params.modulus) * 8} bits but keyBits says "
                        f"{params.key_bits}"
                    )
                modulus = int.from_bytes(params.modulus, "big")
                return rsa.RSAPublicNumbers(exponent, modulus).public_key()
            curve = _CURVES.get(params.curve_id)
            if curve is None:
                raise QuoteError(f"ECC curve 0x{params.curve_id:04x} is not supported")
            curve_type, size = curve
            if len(params.x) > size or len(params.y) > size:
                raise QuoteError(f"ECC point coordinate longer than the {size}-byte curve field")
            point = b"\x04" + params.x.rjust(size, b"\0") + params.y.rjust(size, b"\0")
            return ec.EllipticCurvePublicKey.from_encoded_point(curve_type(), point)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise QuoteError(f"public area does not hold a valid key: {exc}") from exc


_SYMMETRIC_WITH_PARAMETERS: Final = (ALG_AES, ALG_SM4, ALG_CAMELLIA)


def _read_symmetric(reader: _Reader) -> SymmetricDefinition:
    algorithm = reader.u16("symmetric.algorithm")
    if algorithm == ALG_NULL:
        return SymmetricDefinition(ALG_NULL)
    if algorithm not in _SYMMETRIC_WITH_PARAMETERS:
        raise reader.fail(f"symmetric algorithm 0x{algorithm:04x} is not a TPMI_ALG_SYM_OBJECT")
    return SymmetricDefinition(algorithm, reader.u16("symmetric.keyBits"), reader.u16("mode"))


_RSA_SCHEMES_WITH_HASH: Final = (ALG_RSASSA, ALG_RSAPSS, ALG_OAEP)
_ECC_SCHEMES_WITH_HASH: Final = (ALG_ECDSA, ALG_ECDH, ALG_SM2, ALG_ECSCHNORR, ALG_ECMQV)
_KDF_SCHEMES: Final = (ALG_MGF1, ALG_KDF1_SP800_56A, ALG_KDF2, ALG_KDF1_SP800_108)


def _read_public_area(reader: _Reader) -> PublicArea:
    start = reader.offset
    key_type = reader.u16("type")
    name_alg = reader.u16("nameAlg")
    attributes = reader.u32("objectAttributes")
    auth_policy = reader.sized(_MAX_DIGEST, "authPolicy")
    parameters: RsaParameters | EccParameters
    if key_type == ALG_RSA:
        symmetric = _read_symmetric(reader)
        scheme = reader.u16("scheme")
        scheme_hash = ALG_NULL
        if scheme in _RSA_SCHEMES_WITH_HASH:
            scheme_hash = reader.u16("scheme hashAlg")
        elif scheme not in (ALG_NULL, ALG_RSAES):
            raise reader.fail(f"RSA scheme 0x{scheme:04x} is not a TPMI_ALG_RSA_SCHEME")
        key_bits = reader.u16("keyBits")
        exponent = reader.u32("exponent")
        modulus = reader.sized(_MAX_RSA_KEY_BYTES, "unique.rsa")
        parameters = RsaParameters(symmetric, scheme, scheme_hash, key_bits, exponent, modulus)
    elif key_type == ALG_ECC:
        symmetric = _read_symmetric(reader)
        scheme = reader.u16("scheme")
        scheme_hash = ALG_NULL
        if scheme in _ECC_SCHEMES_WITH_HASH:
            scheme_hash = reader.u16("scheme hashAlg")
        elif scheme == ALG_ECDAA:
            scheme_hash = reader.u16("scheme hashAlg")
            reader.u16("ECDAA count")
        elif scheme != ALG_NULL:
            raise reader.fail(f"ECC scheme 0x{scheme:04x} is not a TPMI_ALG_ECC_SCHEME")
        curve_id = reader.u16("curveID")
        kdf_scheme = reader.u16("kdf.scheme")
        kdf_hash = ALG_NULL
        if kdf_scheme in _KDF_SCHEMES:
            kdf_hash = reader.u16("kdf hashAlg")
        elif kdf_scheme != ALG_NULL:
            raise reader.fail(f"KDF scheme 0x{kdf_scheme:04x} is not a TPMI_ALG_KDF")
        x = reader.sized(_MAX_ECC_KEY_BYTES, "unique.ecc.x")
        y = reader.sized(_MAX_ECC_KEY_BYTES, "unique.ecc.y")
        parameters = EccParameters(
            symmetric, scheme, scheme_hash, curve_id, kdf_scheme, kdf_hash, x, y
        )
    else:
        raise reader.fail(f"key type 0x{key_type:04x} is not supported (expected RSA or ECC)")
    encoded = reader._data[start : reader.offset]
    return PublicArea(key_type, name_alg, attributes, auth_policy, parameters, encoded)


def decode_public_area(data: bytes) -> PublicArea:
    """Decode a bare TPMT_PUBLIC; QuoteError on anything malformed."""
    reader = _Reader(data, "TPMT_PUBLIC")
    area = _read_public_area(reader)
    reader.done()
    return area


def decode_public(data: bytes) -> PublicArea:
    """Decode a TPM2B_PUBLIC (size-prefixed TPMT_PUBLIC); QuoteError on anything malformed."""
    reader = _Reader(data, "TPM2B_PUBLIC")
    size = reader.u16("size")
    if size != reader.remaining:
        raise reader.fail(f"size field says {size} bytes but {reader.remaining} follow")
    area = _read_public_area(reader)
    reader.done()
    return area


def compute_name(public: bytes) -> bytes:
    """The TPM Name (nameAlg || H(TPMT_PUBLIC)) of a marshalled TPM2B_PUBLIC."""
    return decode_public(public).name


# --- checks -----------------------------------------------------------------------------------


class Reason(StrEnum):
    """Why a quote or an attestation key was rejected (or what was not checked)."""

    AK_PUBLIC_MALFORMED = "ak_public_malformed"
    AK_NOT_RESTRICTED = "ak_not_restricted"
    AK_NOT_SIGNING = "ak_not_signing"
    AK_NOT_FIXED_TPM = "ak_not_fixed_tpm"
    AK_NOT_FIXED_PARENT = "ak_not_fixed_parent"
    AK_NOT_SENSITIVE_DATA_ORIGIN = "ak_not_sensitive_data_origin"
    AK_DECRYPT = "ak_can_decrypt"
    SIGNATURE_MALFORMED = "signature_malformed"
    SIGNATURE_SCHEME_MISMATCH = "signature_scheme_mismatch"
    SIGNATURE_INVALID = "signature_invalid"
    QUOTE_MALFORMED = "quote_malformed"
    MAGIC_INVALID = "magic_invalid"
    TYPE_NOT_QUOTE = "type_not_quote"
    NONCE_MISMATCH = "nonce_mismatch"
    SELECTION_MISMATCH = "pcr_selection_mismatch"
    PCR_VALUES_INVALID = "pcr_values_invalid"
    PCR_DIGEST_MISMATCH = "pcr_digest_mismatch"
    CLOCK_STATE_OTHER_AK = "clock_state_other_ak"
    CLOCK_NOT_ADVANCED = "clock_not_advanced"
    CLOCK_WENT_BACKWARDS = "clock_went_backwards"
    RESET_COUNT_ROLLED_BACK = "reset_count_rolled_back"
    RESTART_COUNT_ROLLED_BACK = "restart_count_rolled_back"
    FRESHNESS_NOT_CHECKED = "freshness_not_checked"
    CLOCK_NOT_CHECKED = "clock_not_checked"


@dataclass(frozen=True)
class Finding:
    """One failed (or skipped) check: a stable reason code and a sentence for a human."""

    reason: Reason
    message: str


_REQUIRED_AK_ATTRIBUTES: Final = (
    (ATTR_RESTRICTED, Reason.AK_NOT_RESTRICTED, "restricted is clear: it could sign forged quotes"),
    (ATTR_SIGN, Reason.AK_NOT_SIGNING, "sign is clear: it cannot sign quotes"),
    (ATTR_FIXED_TPM, Reason.AK_NOT_FIXED_TPM, "fixedTPM is clear: it could have been duplicated"),
    (
        ATTR_FIXED_PARENT,
        Reason.AK_NOT_FIXED_PARENT,
        "fixedParent is clear: it could have been duplicated",
    ),
    (
        ATTR_SENSITIVE_DATA_ORIGIN,
        Reason.AK_NOT_SENSITIVE_DATA_ORIGIN,
        "sensitiveDataOrigin is clear: its private part came from outside the TPM",
    ),
)


def _attribute_violations(area: PublicArea) -> list[Finding]:
    violations = [
        Finding(reason, f"attestation key attribute {message}")
        for bit, reason, message in _REQUIRED_AK_ATTRIBUTES
        if not area.object_attributes & bit
    ]
    if area.object_attributes & ATTR_DECRYPT:
        violations.append(
            Finding(Reason.AK_DECRYPT, "attestation key attribute decrypt is set: an AK only signs")
        )
    return violations


def check_ak_attributes(ak_public: bytes) -> tuple[Finding, ...]:
    """Every reason a TPM2B_PUBLIC is not acceptable as an AK at enrollment; empty when it is.

    An AK must be restricted (so it only signs TPM-generated data), sign, fixedTPM, fixedParent,
    sensitiveDataOrigin, and not decrypt. A malformed structure raises QuoteError.
    """
    return tuple(_attribute_violations(decode_public(ak_public)))


@dataclass(frozen=True)
class ClockState:
    """The clock of the last quote accepted from one AK, to compare the next one against."""

    ak_name: bytes
    clock: int
    reset_count: int
    restart_count: int


@dataclass(frozen=True)
class QuoteCheckResult:
    """Outcome of :func:`verify_quote`: every failed check, and the checks that were skipped.

    ``clock_state`` is the state to keep for the next quote of this AK (store it only when
    ``ok``); ``attest`` is the decoded quote when it could be decoded.
    """

    failures: tuple[Finding, ...]
    unchecked: tuple[Finding, ...]
    attest: Attest | None
    clock_state: ClockState | None

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def reasons(self) -> frozenset[Reason]:
        return frozenset(finding.reason for finding in self.failures)

    def raise_for_failures(self) -> None:
        """Raise one QuoteError naming every failure; do nothing if the quote verified."""
        if self.failures:
            details = "; ".join(f"{f.reason}: {f.message}" for f in self.failures)
            raise QuoteError(f"quote rejected ({len(self.failures)} failures): {details}")


def normalise_selection(selection: Mapping[str, Sequence[int]]) -> dict[int, tuple[int, ...]]:
    """{bank name: indices} to {TPM_ALG_ID: sorted unique indices}, dropping empty banks.

    QuoteError for an unknown bank or an index outside 0..31 (the caller's mistake, not evidence).
    """
    if not isinstance(selection, Mapping):
        raise QuoteError(f"PCR selection must be a mapping of bank to indices, not {selection!r}")
    result: dict[int, tuple[int, ...]] = {}
    for bank, indices in selection.items():
        alg = hash_algorithm_id(bank)
        chosen = set()
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, int):
                raise QuoteError(f"PCR index {index!r} in bank {bank} is not an integer")
            if not 0 <= index <= MAX_PCR_INDEX:
                raise QuoteError(f"PCR index {index} in bank {bank} is outside 0..{MAX_PCR_INDEX}")
            chosen.add(index)
        if chosen:
            result[alg] = tuple(sorted(chosen))
    if not result:
        raise QuoteError("PCR selection is empty")
    return result


def pcr_digest(
    selection: Sequence[PcrBankSelection], pcrs: Mapping[str, Mapping[int, bytes]], hash_alg: int
) -> bytes:
    """Part 3 TPM2_Quote: H(PCR values concatenated in selection order, each bank ascending).

    QuoteError if a selected value is missing or has the wrong length for its bank.
    """
    concatenated = bytearray()
    for entry in selection:
        values = pcrs.get(entry.bank, {})
        size = digest_size(entry.hash_alg)
        for index in entry.pcrs:
            value = values.get(index)
            if value is None:
                raise QuoteError(f"no value supplied for quoted PCR {entry.bank}:{index}")
            if not isinstance(value, bytes) or len(value) != size:
                raise QuoteError(
                    f"value of PCR {entry.bank}:{index} is not {size} bytes of {entry.bank}"
                )
            concatenated += value
    return hash_bytes(hash_alg, bytes(concatenated))


def _verify_signature(
    ak: PublicArea, signature: Signature, quote: bytes, failures: list[Finding]
) -> None:
    expected_schemes = (ALG_RSASSA, ALG_RSAPSS) if ak.type == ALG_RSA else (ALG_ECDSA,)
    if signature.scheme not in expected_schemes or (
        ak.scheme != ALG_NULL
        and (signature.scheme != ak.scheme or signature.hash_alg != ak.scheme_hash)
    ):
        failures.append(
            Finding(
                Reason.SIGNATURE_SCHEME_MISMATCH,
                f"signature uses scheme 0x{signature.scheme:04x} with "
                f"{bank_name(signature.hash_alg)}, the AK signs with scheme 0x{ak.scheme:04x} "
                f"and {bank_name(ak.scheme_hash)}",
            )
        )
        return
    try:
        key = ak.public_key()
        digest = _hash_factory(signature.hash_alg)
    except QuoteError as exc:
        failures.append(Finding(Reason.SIGNATURE_INVALID, f"signature cannot be verified: {exc}"))
        return
    try:
        if isinstance(signature, EcdsaSignature) and isinstance(key, ec.EllipticCurvePublicKey):
            der = encode_dss_signature(signature.r, signature.s)
            key.verify(der, quote, ec.ECDSA(digest))
        elif isinstance(signature, RsaSignature) and isinstance(key, rsa.RSAPublicKey):
            if signature.scheme == ALG_RSASSA:
                key.verify(signature.signature, quote, padding.PKCS1v15(), digest)
            else:
                # TPMs differ in the PSS salt length they use (hash length or maximum), so let
                # the verifier recover it from the signature.
                pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=padding.PSS.AUTO)
                key.verify(signature.signature, quote, pss, digest)
        else:  # pragma: no cover - the scheme check above pairs key and signature types
            failures.append(Finding(Reason.SIGNATURE_SCHEME_MISMATCH, "key/signature type differ"))
    except InvalidSignature:
        failures.append(
            Finding(
                Reason.SIGNATURE_INVALID, "signature does not verify over the quote with the AK"
            )
        )
    except (ValueError, UnsupportedAlgorithm) as exc:
        failures.append(Finding(Reason.SIGNATURE_INVALID, f"signature cannot be verified: {exc}"))


def _check_selection(
    quoted: QuoteInfo, expected: dict[int, tuple[int, ...]], failures: list[Finding]
) -> None:
    banks = [entry.hash_alg for entry in quoted.selection if entry.pcrs]
    if len(banks) != len(set(banks)):
        failures.append(
            Finding(Reason.SELECTION_MISMATCH, "quoted PCR selection lists a bank more than once")
        )
    quoted_dict = quoted.selection_dict()
    expected_dict = {bank_name(alg): list(pcrs) for alg, pcrs in expected.items()}
    if quoted_dict != expected_dict:
        # CVE-2024-29039 (tpm2-tools checkquote): a quote over fewer PCRs than were asked for
        # must not verify, or unquoted PCR values could be passed off as attested.
        failures.append(
            Finding(
                Reason.SELECTION_MISMATCH,
                f"quote covers PCRs {quoted_dict}, but {expected_dict} was asked for",
            )
        )


def _check_pcr_values(
    quoted: QuoteInfo,
    pcrs: Mapping[str, Mapping[int, bytes]],
    hash_alg: int,
    failures: list[Finding],
) -> None:
    if not isinstance(pcrs, Mapping) or not all(isinstance(v, Mapping) for v in pcrs.values()):
        failures.append(Finding(Reason.PCR_VALUES_INVALID, "PCR values are not {bank: {i: v}}"))
        return
    covered = quoted.selection_dict()
    unquoted = sorted(
        f"{bank}:{index}"
        for bank, values in pcrs.items()
        for index in values
        if index not in covered.get(bank, [])
    )
    if unquoted:
        failures.append(
            Finding(
                Reason.PCR_VALUES_INVALID,
                f"PCR values supplied that the quote does not cover: {', '.join(unquoted)}",
            )
        )
    try:
        computed = pcr_digest(quoted.selection, pcrs, hash_alg)
    except QuoteError as exc:
        failures.append(Finding(Reason.PCR_VALUES_INVALID, str(exc)))
        return
    if not stdlib_hmac.compare_digest(computed, quoted.pcr_digest):
        failures.append(
            Finding(
                Reason.PCR_DIGEST_MISMATCH,
                f"pcrDigest {quoted.pcr_digest.hex()} is not the {bank_name(hash_alg)} of the "
                f"supplied PCR values ({computed.hex()})",
            )
        )


def _check_clock(
    clock: ClockInfo, ak_name: bytes | None, previous: ClockState, failures: list[Finding]
) -> None:
    if ak_name is not None and previous.ak_name != ak_name:
        failures.append(
            Finding(
                Reason.CLOCK_STATE_OTHER_AK,
                f"previous clock state belongs to AK {previous.ak_name.hex()}, not this one",
            )
        )
        return
    # Part 1 "Timing Components": resetCount increments on every TPM Reset (reboot) and
    # restartCount on every TPM Restart/Resume and goes to zero on a Reset; neither decreases
    # short of TPM2_Clear, after which the AK must be enrolled again anyway.
    if clock.reset_count < previous.reset_count:
        failures.append(
            Finding(
                Reason.RESET_COUNT_ROLLED_BACK,
                f"resetCount {clock.reset_count} is below the {previous.reset_count} "
                "already seen from this AK",
            )
        )
        return
    if clock.reset_count == previous.reset_count:
        if clock.restart_count < previous.restart_count:
            failures.append(
                Finding(
                    Reason.RESTART_COUNT_ROLLED_BACK,
                    f"restartCount {clock.restart_count} is below the "
                    f"{previous.restart_count} already seen since the same reset",
                )
            )
            return
        if clock.restart_count == previous.restart_count and clock.clock <= previous.clock:
            failures.append(
                Finding(
                    Reason.CLOCK_NOT_ADVANCED,
                    f"clock {clock.clock} has not advanced past {previous.clock} within the same "
                    "boot: the quote is a replay or older than one already accepted",
                )
            )
        return
    # After a reset Clock carries on from its last NV copy; it may only be lower than a value
    # already reported when the TPM says so by clearing `safe` (Part 2 TPMS_CLOCK_INFO).
    if clock.clock < previous.clock and clock.safe:
        failures.append(
            Finding(
                Reason.CLOCK_WENT_BACKWARDS,
                f"clock {clock.clock} is below {previous.clock} although the TPM reports it safe",
            )
        )


def verify_quote(
    ak_public: bytes,
    quote: bytes,
    signature: bytes,
    pcrs: Mapping[str, Mapping[int, bytes]],
    expected_nonce: bytes | None,
    expected_selection: Mapping[str, Sequence[int]],
    previous: ClockState | None,
) -> QuoteCheckResult:
    """Check a quote against everything a verifier knows, and report every failed check.

    ``ak_public`` is the enrolled AK's TPM2B_PUBLIC, ``quote`` the TPMS_ATTEST bytes,
    ``signature`` the TPMT_SIGNATURE, ``pcrs`` the values the node says were quoted.
    Hostile evidence never raises: malformed parts are failures. Only a malformed
    ``expected_selection`` (the caller's own input) raises QuoteError.
    """
    expected = normalise_selection(expected_selection)
    if expected_nonce is not None and not isinstance(expected_nonce, bytes):
        raise QuoteError(
            f"expected nonce must be bytes or None, not {type(expected_nonce).__name__}"
        )
    failures: list[Finding] = []
    unchecked: list[Finding] = []

    ak: PublicArea | None = None
    ak_name: bytes | None = None
    try:
        ak = decode_public(ak_public)
        ak_name = ak.name
    except QuoteError as exc:
        failures.append(Finding(Reason.AK_PUBLIC_MALFORMED, str(exc)))
        ak = None
    if ak is not None:
        failures.extend(_attribute_violations(ak))

    decoded_signature: Signature | None = None
    try:
        decoded_signature = decode_signature(signature)
    except QuoteError as exc:
        failures.append(Finding(Reason.SIGNATURE_MALFORMED, str(exc)))

    attest: Attest | None = None
    try:
        attest = decode_attest(quote)
    except QuoteError as exc:
        failures.append(Finding(Reason.QUOTE_MALFORMED, str(exc)))

    # The signature is checked even over a quote that does not decode: it says whether the
    # malformed bytes were at least signed by this AK.
    if (
        ak is not None
        and decoded_signature is not None
        and isinstance(quote, bytes | bytearray | memoryview)
    ):
        _verify_signature(ak, decoded_signature, bytes(quote), failures)

    clock_state = None
    if attest is not None:
        if attest.magic != TPM_GENERATED_VALUE:
            failures.append(
                Finding(
                    Reason.MAGIC_INVALID,
                    f"magic is 0x{attest.magic:08x}, not TPM_GENERATED_VALUE: the TPM did not "
                    "produce this structure",
                )
            )
        quote_info = attest.quote_info
        if attest.type != TPM_ST_ATTEST_QUOTE:
            failures.append(
                Finding(
                    Reason.TYPE_NOT_QUOTE,
                    f"type is 0x{attest.type:04x}, not TPM_ST_ATTEST_QUOTE (0x8018)",
                )
            )
            # Still check what can be checked if the body has the shape of a quote.
            try:
                quote_info = decode_quote_info(attest.attested)
            except QuoteError:
                quote_info = None

        if expected_nonce is None:
            unchecked.append(
                Finding(
                    Reason.FRESHNESS_NOT_CHECKED,
                    "freshness not checked: no nonce was expected, so this quote may be a replay",
                )
            )
        elif not stdlib_hmac.compare_digest(attest.extra_data, expected_nonce):
            failures.append(
                Finding(
                    Reason.NONCE_MISMATCH,
                    f"extraData {attest.extra_data.hex()} is not the expected nonce "
                    f"{expected_nonce.hex()}",
                )
            )

        if quote_info is None:
            failures.append(Finding(Reason.QUOTE_MALFORMED, "quote body is not a TPMS_QUOTE_INFO"))
        else:
            _check_selection(quote_info, expected, failures)
            digest_alg = _digest_algorithm(ak, decoded_signature)
            if digest_alg is None:
                failures.append(
                    Finding(
                        Reason.PCR_VALUES_INVALID,
                        "pcrDigest not checked: neither the AK nor the signature names a hash",
                    )
                )
            else:
                _check_pcr_values(quote_info, pcrs, digest_alg, failures)

        if previous is None:
            unchecked.append(
                Finding(
                    Reason.CLOCK_NOT_CHECKED,
                    "clock and reset counters not checked: no earlier quote from this AK",
                )
            )
        else:
            _check_clock(attest.clock_info, ak_name, previous, failures)
        if ak_name is not None:
            clock_state = ClockState(
                ak_name,
                attest.clock_info.clock,
                attest.clock_info.reset_count,
                attest.clock_info.restart_count,
            )
    return QuoteCheckResult(tuple(failures), tuple(unchecked), attest, clock_state)


def _digest_algorithm(ak: PublicArea | None, signature: Signature | None) -> int | None:
    # Part 3 TPM2_Quote: pcrDigest uses the hash of the signing scheme, which for a restricted
    # key is fixed in its public area; fall back to the signature's when the AK has none.
    if ak is not None and ak.scheme_hash != ALG_NULL:
        return ak.scheme_hash
    if signature is not None:
        return signature.hash_alg
    return None


# --- MakeCredential (verifier side) -----------------------------------------------------------


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
        mac = crypto_hmac.HMAC(key, _hash_factory(hash_alg))
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
    if not isinstance(ak_name, bytes) or not 2 < len(ak_name) <= _MAX_NAME:
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
    hash_factory = _hash_factory(name_hash)
    oaep = padding.OAEP(mgf=padding.MGF1(hash_factory), algorithm=hash_factory, label=b"IDENTITY\0")
    try:
        encrypted_seed = key.encrypt(seed, oaep)
    except ValueError as exc:
        raise AttestationError(f"cannot encrypt the seed to the endorsement key: {exc}") from exc
    symmetric_key = kdf_a(name_hash, seed, b"STORAGE", ak_name, b"", symmetric.key_bits)
    # Part 2 TPMS_ID_OBJECT: encIdentity is the whole TPM2B_DIGEST, size field included, in CFB
    # with a zero IV (Part 1 "Credential Protection").
    encryptor = Cipher(algorithms.AES(symmetric_key), CFB(b"\0" * 16)).encryptor()
    enc_identity = encryptor.update(struct.pack(">H", len(secret)) + secret) + encryptor.finalize()
    hmac_key = kdf_a(name_hash, seed, b"INTEGRITY", b"", b"", seed_size * 8)
    mac = crypto_hmac.HMAC(hmac_key, _hash_factory(name_hash))
    mac.update(enc_identity + ak_name)
    integrity = mac.finalize()
    blob = struct.pack(">H", len(integrity)) + integrity + enc_identity
    return Credential(credential_blob=blob, encrypted_secret=encrypted_seed)
