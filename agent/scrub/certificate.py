"""Scrub certificates: what a scrub proved, signed with the node's Ed25519 key.

A certificate is a JSON object::

    {"payload": {...}, "signature": "<base64>", "public_key": "<PEM>", "algorithm": "Ed25519"}

**Canonical encoding** (what is signed). The payload is a JSON object whose values are strings,
integers, booleans, lists and objects only -- never JSON floats or null. Its encoding is
``json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` as UTF-8: keys
sorted by code point, no whitespace, non-ASCII characters as themselves, and only ``"``, ``\\``
and U+0000..U+001F escaped (``\\b \\t \\n \\f \\r`` or ``\\u00xx`` in lowercase hex). Integers
are in [0, 2**53 - 1] and written in decimal. Within these bounds the encoding is the same as
RFC 8785 (JSON Canonicalization Scheme), so other languages can verify with a JCS library.

Quantities that are not integers are **fixed decimal strings**: decimal digits, ``.``, exactly
six digits (``^(0|[1-9][0-9]*)\\.[0-9]{6}$``): ``coverage`` is rounded *down* (a certificate never
claims more than was verified), durations in seconds are rounded to the nearest microsecond.
Times are RFC 3339 UTC with microseconds: ``2025-01-31T12:00:00.000000Z``.

**Signature**: Ed25519 over ``SIGNATURE_CONTEXT + canonical(payload)``; the context string keeps a
signature on some other node-key document from ever being valid as a scrub certificate.
``signature`` is standard base64 with padding, ``public_key`` the key's SubjectPublicKeyInfo PEM,
both exactly as this module writes them (so no byte of a certificate can change unnoticed).

**Verification normalises, it does not compare text**: it re-encodes the parsed payload, so a
certificate file re-serialised with other whitespace, key order or string escapes still verifies;
a changed value, or a value outside the canonical value space (a float, ``1.0`` for ``1``, a
timestamp with ``+00:00``, ``"0.5"`` for ``"0.500000"``, an unknown or missing field) is refused.

**Verification needs a trusted key**: the node key the verifier already knows (pinned at
enrollment, or this node's own). The embedded ``public_key`` must be that key; on its own it only
shows that *someone* signed. A certificate file is read as I-JSON within
:data:`CERTIFICATE_JSON_LIMITS` (:mod:`agent.runtime.inputs`): a duplicated member, which two JSON
parsers could resolve differently, is refused before anything is checked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

import agent
from agent.errors import ScrubError
from agent.identity.node_key import NodeKey, public_pem_of
from agent.runtime.inputs import JsonLimits
from agent.scrub.model import POLICY_PATTERNS, RESET_POLICY, ScrubResult, ScrubTarget

CERTIFICATE_FORMAT: Final = "accelguard-scrub-certificate/1"
ALGORITHM: Final = "Ed25519"
SIGNATURE_CONTEXT: Final = b"accelguard scrub certificate v1\x00"
DECIMAL_PLACES: Final = 6

_MAX_INTEGER: Final = (1 << 53) - 1
_MAX_TEXT: Final = 4096
_MAX_PASSES: Final = 16
_MAX_PEM: Final = 1024
_MAX_DECIMAL: Final = 32
_FIXED_DECIMAL = re.compile(r"^(?:0|[1-9][0-9]*)\.[0-9]{6}\Z")
_TIMESTAMP = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z\Z")
_TIMESTAMP_FORMAT: Final = "%Y-%m-%dT%H:%M:%S.%fZ"
_DOCUMENT_FIELDS: Final = frozenset({"payload", "signature", "public_key", "algorithm"})

# A certificate file as `scrub certs --json` writes one is about 2 KB. The cap is the most a
# certificate this module accepts can take: nine text fields of _MAX_TEXT characters, each at
# worst 12 bytes (a non-BMP character as two \uXXXX escapes), is 442,368 bytes, plus 16 passes
# and indentation. Nothing the node could sign is refused; a 5 GB file is, before it is read.
# Depth and items: the format needs 4 levels and 136 items; the slack leaves small malformed
# documents to the checks below, which name the field that is wrong.
CERTIFICATE_JSON_LIMITS: Final = JsonLimits(max_bytes=512 * 1024, max_depth=8, max_items=1024)
# `scrub certs --json` output (``{"certificates": [...]}``) given to verify-cert: up to 1024
# certificates; each is then held to CERTIFICATE_JSON_LIMITS on its own.
CERTIFICATE_LIST_JSON_LIMITS: Final = JsonLimits(
    max_bytes=64 * 1024 * 1024, max_depth=10, max_items=1024 * 1024
)
# A public key PEM is 113 bytes; room for a comment line or CRLFs (parsing bounds it to _MAX_PEM).
MAX_PUBLIC_KEY_FILE_BYTES: Final = 4096


def key_fingerprint(public_pem: str) -> str:
    """SHA-256 of the raw 32-byte public key, hex: a short name for a node key."""
    return hashlib.sha256(_raw(_load_public_key(public_pem, "public key"))).hexdigest()


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ---------------------------------------------------------------------------------------------
# Encoding.


def canonical_json(payload: Mapping[str, Any]) -> bytes:
    """The canonical encoding (module docstring) of an already validated payload."""
    try:
        return json.dumps(
            payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as error:
        raise ScrubError(f"payload cannot be encoded canonically: {error}") from error


def fixed_decimal(value: Decimal) -> str:
    """``value`` (non-negative, already rounded as the caller wants) with six decimal places."""
    return f"{value.quantize(Decimal(1).scaleb(-DECIMAL_PLACES)):f}"


def coverage_text(bytes_verified: int, bytes_total: int) -> str:
    """Verified / total, rounded down to six places and capped at 1 (never inflated)."""
    if bytes_total <= 0:
        return fixed_decimal(Decimal(0))
    scale = 10**DECIMAL_PLACES
    millionths = min(scale, max(0, bytes_verified) * scale // bytes_total)
    return fixed_decimal(Decimal(millionths).scaleb(-DECIMAL_PLACES))


def seconds_text(seconds: float) -> str:
    try:
        value = Decimal(repr(float(seconds)))
        if not value.is_finite() or value < 0:
            raise ScrubError(f"a duration must be a finite, non-negative number (got {seconds!r})")
        return fixed_decimal(
            value.quantize(Decimal(1).scaleb(-DECIMAL_PLACES), rounding=ROUND_HALF_EVEN)
        )
    except (InvalidOperation, ValueError, OverflowError) as error:
        raise ScrubError(f"invalid duration {seconds!r}: {error}") from error


def timestamp_text(moment: datetime) -> str:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ScrubError(f"timestamp {moment.isoformat()} has no time zone")
    return moment.astimezone(UTC).strftime(_TIMESTAMP_FORMAT)


# ---------------------------------------------------------------------------------------------
# Issuing.


def issue_certificate(
    key: NodeKey,
    *,
    node_id: str,
    target: ScrubTarget,
    gpu_serial: str,
    previous_lease_id: str,
    previous_tenant: str,
    result: ScrubResult,
    started_at: datetime,
    finished_at: datetime,
) -> dict[str, Any]:
    """Sign what ``result`` proved about ``target``. ``previous_lease_id``/``previous_tenant``
    are empty strings when the partition had no lease before (a scrub at enrollment, say)."""
    payload: dict[str, Any] = {
        "format": CERTIFICATE_FORMAT,
        "node_id": node_id,
        "partition_uuid": target.partition_uuid,
        "partition_kind": target.kind,
        "gpu_uuid": target.gpu_uuid,
        "gpu_serial": gpu_serial,
        "previous_lease_id": previous_lease_id,
        "previous_tenant": previous_tenant,
        "policy": result.policy,
        "backend": result.backend,
        "bytes_total": result.total_bytes,
        "bytes_written": result.bytes_written,
        "bytes_verified": result.bytes_verified,
        "coverage": coverage_text(result.bytes_verified, result.total_bytes),
        "passes": [
            {
                "pattern": p.pattern,
                "bytes_written": p.bytes_written,
                "bytes_verified": p.bytes_verified,
                "mismatched_bytes": p.mismatched_bytes,
                "write_seconds": seconds_text(p.write_seconds),
                "verify_seconds": seconds_text(p.verify_seconds),
            }
            for p in result.passes
        ],
        "verified": result.verified,
        # Free text for people; cut rather than refuse, a certificate must still be issued.
        "detail": result.detail[:_MAX_TEXT],
        "started_at": timestamp_text(started_at),
        "finished_at": timestamp_text(finished_at),
        "agent_version": agent.__version__,
    }
    # The signer checks what the verifier checks: a certificate that would be refused is a bug
    # here, and must never leave the node signed.
    _check_payload(payload)
    signature = key.sign(SIGNATURE_CONTEXT + canonical_json(payload))
    return {
        "payload": payload,
        "signature": base64.b64encode(signature).decode("ascii"),
        "public_key": key.public_pem(),
        "algorithm": ALGORITHM,
    }


# ---------------------------------------------------------------------------------------------
# Verifying.


@dataclass(frozen=True)
class VerifiedCertificate:
    """A certificate whose signature and structure are valid.

    ``scrub_verified`` is the separate question of what it certifies: False means the node signed
    that the scrub did NOT prove the memory clean (a mismatch, or a pass that covered nothing).
    """

    payload: dict[str, Any]
    public_key_pem: str
    key_fingerprint: str

    @property
    def scrub_verified(self) -> bool:
        return bool(self.payload["verified"])

    @property
    def coverage(self) -> Decimal:
        return Decimal(self.payload["coverage"])


def verify_certificate(document: object, public_key_pem: str) -> VerifiedCertificate:
    """Check a parsed certificate against the trusted node key ``public_key_pem``; raise
    ScrubError saying why it is refused.

    The key is required: the certificate's embedded key proves nothing by itself (anyone can
    re-sign an edited payload with a key of their own and embed that), so it must equal the key
    the caller already trusts. Any JSON value may be passed in; nothing but ScrubError is raised.
    """
    if not isinstance(document, dict):
        raise ScrubError(f"certificate must be a JSON object, not {_json_type(document)}")
    if set(document) != _DOCUMENT_FIELDS:
        raise ScrubError(
            "certificate fields must be exactly "
            f"{sorted(_DOCUMENT_FIELDS)}; got {sorted(map(str, document))}"
        )
    if document["algorithm"] != ALGORITHM:
        raise ScrubError(f"unsupported signature algorithm {document['algorithm']!r:.40}")
    embedded_pem = document["public_key"]
    if not isinstance(embedded_pem, str):
        raise ScrubError(f"public_key must be a PEM string, not {_json_type(embedded_pem)}")
    embedded = _load_public_key(embedded_pem, "certificate public_key")
    if public_pem_of(embedded) != embedded_pem:
        raise ScrubError("certificate public_key is not in canonical PEM form")
    trusted = _load_public_key(public_key_pem, "trusted public key")
    if _raw(trusted) != _raw(embedded):
        raise ScrubError(
            "certificate was signed by key "
            f"{hashlib.sha256(_raw(embedded)).hexdigest()[:16]}, not the trusted node key "
            f"{hashlib.sha256(_raw(trusted)).hexdigest()[:16]}"
        )
    signature = _decode_signature(document["signature"])
    payload = document["payload"]
    _check_payload(payload)
    try:
        embedded.verify(signature, SIGNATURE_CONTEXT + canonical_json(payload))
    except InvalidSignature as error:
        raise ScrubError(
            "bad signature: the certificate was altered or not signed by its key"
        ) from error
    return VerifiedCertificate(
        payload=json.loads(canonical_json(payload)),
        public_key_pem=embedded_pem,
        key_fingerprint=hashlib.sha256(_raw(embedded)).hexdigest(),
    )


def _json_type(value: object) -> str:
    return type(value).__name__


def _load_public_key(pem: str, what: str) -> Ed25519PublicKey:
    if not isinstance(pem, str) or len(pem) > _MAX_PEM:
        raise ScrubError(f"{what} is not a PEM string of at most {_MAX_PEM} characters")
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise ScrubError(f"{what} is not a PEM public key: {error}") from error
    if not isinstance(key, Ed25519PublicKey):
        raise ScrubError(f"{what} is not an Ed25519 key")
    return key


def _decode_signature(text: object) -> bytes:
    if not isinstance(text, str) or len(text) != 88:
        raise ScrubError("signature must be 88 characters of base64 (64 bytes)")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ScrubError(f"signature is not base64: {error}") from error
    # The last base64 digit of 64 bytes carries 4 unused bits that decoders ignore: without this
    # check, 16 different strings would all decode to the same valid signature.
    if len(raw) != 64 or base64.b64encode(raw).decode("ascii") != text:
        raise ScrubError("signature is not canonical base64 of 64 bytes")
    return raw


def _text(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise ScrubError(f"payload.{field} must be a string, not {_json_type(value)}")
    if len(value) > _MAX_TEXT:
        raise ScrubError(f"payload.{field} is longer than {_MAX_TEXT} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ScrubError(f"payload.{field} is not valid Unicode text: {error.reason}") from error
    return value


def _required_text(value: object, field: str) -> str:
    text = _text(value, field)
    if not text:
        raise ScrubError(f"payload.{field} must not be empty")
    return text


def _integer(value: object, field: str, maximum: int = _MAX_INTEGER) -> int:
    # bool is an int subclass in Python, and 1.0 == 1: neither is an integer here.
    if type(value) is not int:
        raise ScrubError(f"payload.{field} must be an integer, not {_json_type(value)}")
    if not 0 <= value <= maximum:
        raise ScrubError(f"payload.{field} = {value} is outside [0, {maximum}]")
    return value


def _decimal(value: object, field: str) -> Decimal:
    if (
        not isinstance(value, str)
        or len(value) > _MAX_DECIMAL
        or _FIXED_DECIMAL.fullmatch(value) is None
    ):
        raise ScrubError(
            f"payload.{field} must be a fixed decimal string with {DECIMAL_PLACES} places "
            f"(e.g. '0.500000'), not {value!r:.40}"
        )
    return Decimal(value)


def _timestamp(value: object, field: str) -> datetime:
    if not isinstance(value, str) or _TIMESTAMP.fullmatch(value) is None:
        raise ScrubError(
            f"payload.{field} must be an RFC 3339 UTC time like 2025-01-31T12:00:00.000000Z, "
            f"not {value!r:.40}"
        )
    try:
        return datetime.strptime(value, _TIMESTAMP_FORMAT).replace(tzinfo=UTC)
    except ValueError as error:
        raise ScrubError(f"payload.{field} is not a valid time: {error}") from error


_PASS_FIELDS: Final = frozenset(
    {
        "pattern",
        "bytes_written",
        "bytes_verified",
        "mismatched_bytes",
        "write_seconds",
        "verify_seconds",
    }
)
_PARTITION_KINDS: Final = ("gpu", "mig", "npu", "vnpu", "accel")
_PAYLOAD_FIELDS: Final = frozenset(
    {
        "format",
        "node_id",
        "partition_uuid",
        "partition_kind",
        "gpu_uuid",
        "gpu_serial",
        "previous_lease_id",
        "previous_tenant",
        "policy",
        "backend",
        "bytes_total",
        "bytes_written",
        "bytes_verified",
        "coverage",
        "passes",
        "verified",
        "detail",
        "started_at",
        "finished_at",
        "agent_version",
    }
)


def _exact_fields(value: object, fields: frozenset[str], where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ScrubError(f"{where} must be a JSON object, not {_json_type(value)}")
    missing = sorted(fields - value.keys())
    if missing:
        raise ScrubError(f"{where} lacks {', '.join(missing)}")
    unknown = sorted(map(str, value.keys() - fields))
    if unknown:
        raise ScrubError(f"{where} has unknown fields {', '.join(unknown)[:200]}")
    return value


def _check_payload(value: object) -> None:
    """Types, formats and internal consistency; raises ScrubError naming the first problem."""
    payload = _exact_fields(value, _PAYLOAD_FIELDS, "payload")
    if payload["format"] != CERTIFICATE_FORMAT:
        raise ScrubError(f"payload.format is {payload['format']!r:.60}, not {CERTIFICATE_FORMAT}")
    for field in ("node_id", "partition_uuid", "gpu_uuid", "backend", "agent_version"):
        _required_text(payload[field], field)
    for field in ("gpu_serial", "previous_lease_id", "previous_tenant", "detail"):
        _text(payload[field], field)
    if payload["partition_kind"] not in _PARTITION_KINDS:
        raise ScrubError(
            f"payload.partition_kind must be one of {', '.join(_PARTITION_KINDS)}, "
            f"not {payload['partition_kind']!r:.40}"
        )
    policy = payload["policy"]
    if not isinstance(policy, str) or policy not in (*POLICY_PATTERNS, RESET_POLICY):
        raise ScrubError(
            f"payload.policy must be one of {sorted((*POLICY_PATTERNS, RESET_POLICY))}, "
            f"not {policy!r:.40}"
        )
    total = _integer(payload["bytes_total"], "bytes_total")
    written = _integer(payload["bytes_written"], "bytes_written")
    verified_bytes = _integer(payload["bytes_verified"], "bytes_verified")
    _decimal(payload["coverage"], "coverage")
    if type(payload["verified"]) is not bool:
        raise ScrubError(f"payload.verified must be true or false, not {payload['verified']!r:.40}")
    started = _timestamp(payload["started_at"], "started_at")
    finished = _timestamp(payload["finished_at"], "finished_at")
    if finished < started:
        raise ScrubError("payload.finished_at is before payload.started_at")

    raw_passes = payload["passes"]
    if not isinstance(raw_passes, list) or len(raw_passes) > _MAX_PASSES:
        raise ScrubError(f"payload.passes must be a list of at most {_MAX_PASSES} passes")
    passes = []
    for index, raw in enumerate(raw_passes):
        where = f"passes[{index}]"
        entry = _exact_fields(raw, _PASS_FIELDS, f"payload.{where}")
        passes.append(
            (
                _integer(entry["pattern"], f"{where}.pattern", 0xFFFFFFFF),
                _integer(entry["bytes_written"], f"{where}.bytes_written"),
                _integer(entry["bytes_verified"], f"{where}.bytes_verified"),
                _integer(entry["mismatched_bytes"], f"{where}.mismatched_bytes"),
            )
        )
        _decimal(entry["write_seconds"], f"{where}.write_seconds")
        _decimal(entry["verify_seconds"], f"{where}.verify_seconds")

    # The summary fields must follow from the passes (as ScrubResult computes them): a verifier
    # must not have to trust the node's `verified` flag on its own.
    patterns = tuple(p[0] for p in passes)
    if policy == RESET_POLICY and passes:
        raise ScrubError("payload.passes must be empty for policy 'reset' (nothing is written)")
    if passes and patterns != POLICY_PATTERNS[policy]:
        raise ScrubError(
            f"payload.passes patterns {[f'0x{p:08x}' for p in patterns]} are not policy "
            f"{policy!r}'s {[f'0x{p:08x}' for p in POLICY_PATTERNS[policy]]}"
        )
    if written != min((p[1] for p in passes), default=0):
        raise ScrubError("payload.bytes_written is not the smallest pass's bytes_written")
    if verified_bytes != min((p[2] for p in passes), default=0):
        raise ScrubError("payload.bytes_verified is not the smallest pass's bytes_verified")
    if payload["coverage"] != coverage_text(verified_bytes, total):
        raise ScrubError(
            f"payload.coverage {payload['coverage']} is not bytes_verified/bytes_total "
            f"({coverage_text(verified_bytes, total)}, rounded down)"
        )
    expected = bool(passes) and all(p[3] == 0 and p[2] > 0 for p in passes)
    if payload["verified"] is not expected:
        raise ScrubError(
            f"payload.verified is {str(payload['verified']).lower()} but the passes say "
            f"{str(expected).lower()}"
        )
