"""TPM 2.0 structures on the wire: decoders for quotes, signatures and public areas, PCR selections.

Everything here is pure (no TPM, no I/O) because the controller runs it on evidence that arrived
over the network: every decoder treats its input as hostile, bounds every length and count, and
raises only :class:`~agent.errors.QuoteError` whatever the bytes are. Structure layouts and
constants are from the TPM 2.0 Library specification (Part 1 "Architecture", Part 2 "Structures",
Part 3 "Commands"); comments name the structure or command a rule comes from. Judging what was
decoded is ``checks.py``'s job; algorithm IDs and hashes come from ``algorithms.py``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.attest.reader import ByteReader
from agent.attest.tpm.algorithms import (
    ALG_AES,
    ALG_CAMELLIA,
    ALG_ECC,
    ALG_ECDAA,
    ALG_ECDH,
    ALG_ECDSA,
    ALG_ECMQV,
    ALG_ECSCHNORR,
    ALG_KDF1_SP800_56A,
    ALG_KDF1_SP800_108,
    ALG_KDF2,
    ALG_MGF1,
    ALG_NULL,
    ALG_OAEP,
    ALG_RSA,
    ALG_RSAES,
    ALG_RSAPSS,
    ALG_RSASSA,
    ALG_SM2,
    ALG_SM4,
    ECC_CURVES,
    MAX_DIGEST_BYTES,
    bank_name,
    digest_size,
    hash_algorithm_id,
    hash_bytes,
)
from agent.errors import QuoteError

# Part 2 TPM_GENERATED: a restricted signing key only signs data the TPM produced itself
# when the data starts with this value, which is what makes a quote unforgeable.
TPM_GENERATED_VALUE: Final = 0xFF544347
# Part 2 TPM_ST
TPM_ST_ATTEST_QUOTE: Final = 0x8018

# Part 2 TPMA_OBJECT bits
ATTR_FIXED_TPM: Final = 1 << 1
ATTR_FIXED_PARENT: Final = 1 << 4
ATTR_SENSITIVE_DATA_ORIGIN: Final = 1 << 5
ATTR_USER_WITH_AUTH: Final = 1 << 6
ATTR_RESTRICTED: Final = 1 << 16
ATTR_DECRYPT: Final = 1 << 17
ATTR_SIGN: Final = 1 << 18

# Bounds from Part 2 for an implementation that supports SHA-512, RSA-4096 and P-521; anything
# longer cannot have come from a TPM. Whole-structure limits stop us reading megabytes of junk.
MAX_NAME_BYTES: Final = 2 + MAX_DIGEST_BYTES  # sizeof(TPMU_NAME): a TPMT_HA
_MAX_DATA: Final = 2 + MAX_DIGEST_BYTES  # TPM2B_DATA is sizeof(TPMT_HA)
_MAX_RSA_KEY_BYTES: Final = 512
_MAX_ECC_KEY_BYTES: Final = 128
_MAX_PCR_BANKS: Final = 16  # HASH_COUNT, with room to spare
_MAX_PCR_SELECT_BYTES: Final = 4  # PCR_SELECT_MAX in tpm2-tss: 32 PCRs
MAX_PCR_INDEX: Final = _MAX_PCR_SELECT_BYTES * 8 - 1
MAX_STRUCTURE_BYTES: Final = 4096

_SHORTFALL: Final = "truncated {what} (needs {needed} bytes, {remaining} left)"


def _reader(data: bytes, structure: str) -> ByteReader:
    """A reader over TPM marshalling (big-endian, unpadded); errors name ``structure``."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise QuoteError(f"{structure}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_STRUCTURE_BYTES:
        raise QuoteError(
            f"{structure}: {len(data)} bytes is larger than any TPM produces "
            f"(limit {MAX_STRUCTURE_BYTES})"
        )

    def error(offset: int, message: str) -> QuoteError:
        return QuoteError(f"{structure}: {message} at byte offset {offset}")

    return ByteReader(data, byteorder="big", error=error, shortfall=_SHORTFALL)


def _sized(reader: ByteReader, limit: int, what: str) -> bytes:
    """A TPM2B: UINT16 size then that many bytes, with the size bounded by the type's union."""
    size = reader.u16(f"{what} size")
    if size > limit:
        raise reader.fail(f"{what} size {size} exceeds the maximum {limit}")
    return reader.take(size, what)


def _done(reader: ByteReader) -> None:
    if reader.remaining:
        raise reader.fail(f"{reader.remaining} trailing bytes after the structure")


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


def _read_pcr_selection(reader: ByteReader) -> tuple[PcrBankSelection, ...]:
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


def _read_quote_info(reader: ByteReader) -> QuoteInfo:
    selection = _read_pcr_selection(reader)
    pcr_digest = _sized(reader, MAX_DIGEST_BYTES, "pcrDigest")
    return QuoteInfo(selection, pcr_digest)


def decode_quote_info(data: bytes) -> QuoteInfo:
    """Decode a marshalled TPMS_QUOTE_INFO; QuoteError on anything malformed."""
    reader = _reader(data, "TPMS_QUOTE_INFO")
    info = _read_quote_info(reader)
    _done(reader)
    return info


def decode_attest(data: bytes) -> Attest:
    """Decode TPMS_ATTEST (the contents of a TPM2B_ATTEST); QuoteError on anything malformed.

    Values are decoded, not judged: a wrong magic or type decodes fine and is reported by
    :func:`verify_quote`. The body is decoded as TPMS_QUOTE_INFO only when ``type`` says quote.
    """
    reader = _reader(data, "TPMS_ATTEST")
    magic = reader.u32("magic")
    attest_type = reader.u16("type")
    qualified_signer = _sized(reader, MAX_NAME_BYTES, "qualifiedSigner")
    extra_data = _sized(reader, _MAX_DATA, "extraData")
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
        body = _reader(attested, f"TPMS_ATTEST quote body at offset {body_offset}")
        quote_info = _read_quote_info(body)
        _done(body)
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
    reader = _reader(data, "TPMT_SIGNATURE")
    scheme = reader.u16("sigAlg")
    result: Signature
    if scheme in (ALG_RSASSA, ALG_RSAPSS):
        hash_alg = reader.u16("hash")
        value = _sized(reader, _MAX_RSA_KEY_BYTES, "RSA signature")
        result = RsaSignature(scheme, hash_alg, value)
    elif scheme == ALG_ECDSA:
        hash_alg = reader.u16("hash")
        r = _sized(reader, _MAX_ECC_KEY_BYTES, "signatureR")
        s = _sized(reader, _MAX_ECC_KEY_BYTES, "signatureS")
        result = EcdsaSignature(hash_alg, int.from_bytes(r, "big"), int.from_bytes(s, "big"))
    else:
        raise reader.fail(
            f"signature scheme 0x{scheme:04x} is not supported (expected RSASSA, RSAPSS or ECDSA)"
        )
    _done(reader)
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
            curve = ECC_CURVES.get(params.curve_id)
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


def _read_symmetric(reader: ByteReader) -> SymmetricDefinition:
    algorithm = reader.u16("symmetric.algorithm")
    if algorithm == ALG_NULL:
        return SymmetricDefinition(ALG_NULL)
    if algorithm not in _SYMMETRIC_WITH_PARAMETERS:
        raise reader.fail(f"symmetric algorithm 0x{algorithm:04x} is not a TPMI_ALG_SYM_OBJECT")
    return SymmetricDefinition(algorithm, reader.u16("symmetric.keyBits"), reader.u16("mode"))


_RSA_SCHEMES_WITH_HASH: Final = (ALG_RSASSA, ALG_RSAPSS, ALG_OAEP)
_ECC_SCHEMES_WITH_HASH: Final = (ALG_ECDSA, ALG_ECDH, ALG_SM2, ALG_ECSCHNORR, ALG_ECMQV)
_KDF_SCHEMES: Final = (ALG_MGF1, ALG_KDF1_SP800_56A, ALG_KDF2, ALG_KDF1_SP800_108)


def _read_public_area(reader: ByteReader) -> PublicArea:
    start = reader.offset
    key_type = reader.u16("type")
    name_alg = reader.u16("nameAlg")
    attributes = reader.u32("objectAttributes")
    auth_policy = _sized(reader, MAX_DIGEST_BYTES, "authPolicy")
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
        modulus = _sized(reader, _MAX_RSA_KEY_BYTES, "unique.rsa")
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
        x = _sized(reader, _MAX_ECC_KEY_BYTES, "unique.ecc.x")
        y = _sized(reader, _MAX_ECC_KEY_BYTES, "unique.ecc.y")
        parameters = EccParameters(
            symmetric, scheme, scheme_hash, curve_id, kdf_scheme, kdf_hash, x, y
        )
    else:
        raise reader.fail(f"key type 0x{key_type:04x} is not supported (expected RSA or ECC)")
    encoded = reader.since(start)
    return PublicArea(key_type, name_alg, attributes, auth_policy, parameters, encoded)


def decode_public_area(data: bytes) -> PublicArea:
    """Decode a bare TPMT_PUBLIC; QuoteError on anything malformed."""
    reader = _reader(data, "TPMT_PUBLIC")
    area = _read_public_area(reader)
    _done(reader)
    return area


def decode_public(data: bytes) -> PublicArea:
    """Decode a TPM2B_PUBLIC (size-prefixed TPMT_PUBLIC); QuoteError on anything malformed."""
    reader = _reader(data, "TPM2B_PUBLIC")
    size = reader.u16("size")
    if size != reader.remaining:
        raise reader.fail(f"size field says {size} bytes but {reader.remaining} follow")
    area = _read_public_area(reader)
    _done(reader)
    return area


def compute_name(public: bytes) -> bytes:
    """The TPM Name (nameAlg || H(TPMT_PUBLIC)) of a marshalled TPM2B_PUBLIC."""
    return decode_public(public).name


# --- PCR selections --------------------------------------------------------------------------


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
