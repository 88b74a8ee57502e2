"""The evidence document: what a node sends to prove its boot state, version 1.

One JSON object; binary fields are standard base64, PCR values and the nonce are hex::

    {
      "version": 1,
      "ak_public": "<base64 TPM2B_PUBLIC of the attestation key>",
      "quote": "<base64 TPMS_ATTEST bytes>",
      "signature": "<base64 TPMT_SIGNATURE bytes>",
      "pcrs": {"sha256": {"0": "<hex>", ...}},
      "nonce": "<hex>",
      "event_log": "<base64 binary_bios_measurements>",
      "ima_log": "<base64 binary_runtime_measurements, from entry ima_start_index on>",
      "ima_start_index": 0,
      "ek_certificate": "<base64 DER>"
    }

``ima_log``, ``ima_start_index`` and ``ek_certificate`` are optional. The same document travels
over the controller link, so :func:`parse_evidence` treats it as hostile: the document and each
field are bounded before they are decoded, unknown and duplicate keys are rejected, base64 must
be canonical, and every problem raises :class:`~agent.errors.AttestationError` naming the field.
Parsing checks shape only; :mod:`agent.attest.verify.engine` judges the contents.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from agent.attest.logs import eventlog, ima
from agent.attest.reader import read_bounded
from agent.attest.tpm.algorithms import BANKS, PCR_COUNT, hash_algorithm_id
from agent.attest.tpm.wire import MAX_STRUCTURE_BYTES
from agent.errors import AttestationError, QuoteError

if TYPE_CHECKING:
    from agent.attest.tpm.client import TpmClient
    from agent.attest.tpm.keys import AttestationKey

EVIDENCE_VERSION: Final = 1

# TPM structures: tpm/wire.py refuses anything larger, so nothing larger is worth keeping.
MAX_TPM_STRUCTURE_BYTES: Final = MAX_STRUCTURE_BYTES
# TPM2_Quote's qualifyingData is a TPM2B_DATA: at most sizeof(TPMT_HA) = 66 bytes;
# tpm/client.py sends at most 64.
MAX_NONCE_BYTES: Final = 64
MAX_EVENT_LOG_BYTES: Final = eventlog.MAX_LOG_BYTES
# The node ships the IMA list incrementally (ima_start_index), so one document carries far less
# than a whole list may hold (ima.MAX_LOG_BYTES); a first attestation of a busy server carries a
# few tens of MiB.
MAX_IMA_LOG_BYTES: Final = 64 * 1024 * 1024
# EK certificates are 1-2 KiB; tpm/client.py reads at most 16 KiB from NV.
MAX_EK_CERTIFICATE_BYTES: Final = 16 * 1024
# base64 grows 4/3; the JSON around the fields is small.
MAX_DOCUMENT_BYTES: Final = (MAX_EVENT_LOG_BYTES + MAX_IMA_LOG_BYTES) * 4 // 3 + 1024 * 1024
MAX_BANKS: Final = 8

_REQUIRED: Final = ("version", "ak_public", "quote", "signature", "pcrs", "nonce", "event_log")
_OPTIONAL: Final = ("ima_log", "ima_start_index", "ek_certificate")
_BASE64: Final = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_HEX: Final = re.compile(r"(?:[0-9a-f]{2})*")


@dataclass(frozen=True)
class Evidence:
    """A parsed evidence document (see the module docstring for the fields)."""

    ak_public: bytes
    quote: bytes
    signature: bytes
    # bank -> PCR index -> value, as the node read them right after the quote.
    pcrs: Mapping[str, Mapping[int, bytes]]
    nonce: bytes
    event_log: bytes
    ima_log: bytes | None = None
    # Index of the first entry in ``ima_log`` (0 unless the node ships only new entries).
    ima_start_index: int = 0
    ek_certificate: bytes | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, object]:
        document: dict[str, object] = {
            "version": EVIDENCE_VERSION,
            "ak_public": _b64(self.ak_public),
            "quote": _b64(self.quote),
            "signature": _b64(self.signature),
            "pcrs": {
                bank: {str(index): value.hex() for index, value in sorted(values.items())}
                for bank, values in sorted(self.pcrs.items())
            },
            "nonce": self.nonce.hex(),
            "event_log": _b64(self.event_log),
        }
        if self.ima_log is not None:
            document["ima_log"] = _b64(self.ima_log)
            document["ima_start_index"] = self.ima_start_index
        if self.ek_certificate is not None:
            document["ek_certificate"] = _b64(self.ek_certificate)
        return document

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def parse_evidence(text: str | bytes) -> Evidence:
    """Parse and validate an evidence document; AttestationError names the bad field."""
    if not isinstance(text, str | bytes | bytearray):
        raise AttestationError(f"evidence: expected JSON text, not {type(text).__name__}")
    if len(text) > MAX_DOCUMENT_BYTES:
        raise AttestationError(
            f"evidence: document is {len(text)} bytes, over the {MAX_DOCUMENT_BYTES}-byte limit"
        )
    try:
        document = json.loads(
            text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant
        )
    except AttestationError:
        raise
    except (ValueError, RecursionError) as error:
        # json.JSONDecodeError and UnicodeDecodeError are ValueErrors; so is an integer literal
        # past Python's int-string conversion limit.
        raise AttestationError(f"evidence: not valid JSON: {error}") from None
    return evidence_from_dict(document)


def evidence_from_dict(document: object) -> Evidence:
    """Validate an already-decoded JSON document (e.g. one embedded in a link message)."""
    if not isinstance(document, dict):
        raise AttestationError("evidence: must be a JSON object")
    unknown = sorted(str(key) for key in document if key not in _REQUIRED + _OPTIONAL)
    if unknown:
        raise AttestationError(
            f"evidence.{unknown[0][:64]}: unknown field; version {EVIDENCE_VERSION} has "
            f"{', '.join(_REQUIRED + _OPTIONAL)}"
        )
    for key in _REQUIRED:
        if key not in document:
            raise AttestationError(f"evidence.{key}: required field is missing")
    version = document["version"]
    if type(version) is not int or version != EVIDENCE_VERSION:
        raise AttestationError(
            f"evidence.version: {str(version)[:32]!r} is not supported, expected {EVIDENCE_VERSION}"
        )
    ima_log = None
    if "ima_log" in document:
        ima_log = _base64_field(document, "ima_log", MAX_IMA_LOG_BYTES)
    start = document.get("ima_start_index", 0)
    if "ima_start_index" in document and ima_log is None:
        raise AttestationError("evidence.ima_start_index: given without ima_log")
    if type(start) is not int or not 0 <= start < ima.MAX_ENTRIES:
        raise AttestationError(
            f"evidence.ima_start_index: must be an integer 0 to {ima.MAX_ENTRIES - 1}"
        )
    certificate = None
    if "ek_certificate" in document:
        certificate = _base64_field(document, "ek_certificate", MAX_EK_CERTIFICATE_BYTES)
    return Evidence(
        ak_public=_base64_field(document, "ak_public", MAX_TPM_STRUCTURE_BYTES, required=True),
        quote=_base64_field(document, "quote", MAX_TPM_STRUCTURE_BYTES, required=True),
        signature=_base64_field(document, "signature", MAX_TPM_STRUCTURE_BYTES, required=True),
        pcrs=_pcrs_field(document["pcrs"]),
        nonce=_nonce_field(document["nonce"]),
        event_log=_base64_field(document, "event_log", MAX_EVENT_LOG_BYTES, required=True),
        ima_log=ima_log,
        ima_start_index=start,
        ek_certificate=certificate,
    )


def load_evidence(path: str | Path) -> Evidence:
    return parse_evidence(read_bounded(path, MAX_DOCUMENT_BYTES, "evidence", AttestationError))


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            # Two parsers of one document must not see different values (JSON interop).
            raise AttestationError(f"evidence: key {key[:64]!r} appears twice")
        result[key] = value
    return result


def _reject_constant(name: str) -> object:
    raise AttestationError(f"evidence: {name} is not valid JSON")


def _base64_field(
    document: Mapping[str, object], key: str, limit: int, *, required: bool = False
) -> bytes:
    value = document[key]
    where = f"evidence.{key}"
    if not isinstance(value, str):
        raise AttestationError(f"{where}: must be a base64 string")
    if len(value) > (limit + 2) // 3 * 4:
        raise AttestationError(f"{where}: longer than the {limit}-byte limit")
    if len(value) % 4 or not _BASE64.fullmatch(value):
        raise AttestationError(f"{where}: not base64 (standard alphabet, with padding)")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise AttestationError(f"{where}: not base64: {error}") from None
    # Unused bits in the last character must be zero: one byte string, one encoding.
    if _b64(data) != value:
        raise AttestationError(f"{where}: non-canonical base64 (unused bits set)")
    if required and not data:
        raise AttestationError(f"{where}: must not be empty")
    return data


def _nonce_field(value: object) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * MAX_NONCE_BYTES or not _HEX.fullmatch(value):
        raise AttestationError(
            f"evidence.nonce: must be lower-case hex of at most {MAX_NONCE_BYTES} bytes"
        )
    return bytes.fromhex(value)


def _pcrs_field(value: object) -> dict[str, dict[int, bytes]]:
    if not isinstance(value, dict) or not value:
        raise AttestationError("evidence.pcrs: must be a non-empty object of bank -> PCR -> hex")
    if len(value) > MAX_BANKS:
        raise AttestationError(f"evidence.pcrs: more than {MAX_BANKS} banks")
    result: dict[str, dict[int, bytes]] = {}
    for bank, values in value.items():
        where = f"evidence.pcrs.{str(bank)[:32]}"
        try:
            size = BANKS[bank].digest_size
            hash_algorithm_id(bank)
        except (KeyError, QuoteError):
            raise AttestationError(f"{where}: unknown bank; known: {', '.join(BANKS)}") from None
        if not isinstance(values, dict) or not values:
            raise AttestationError(f"{where}: must be a non-empty object of PCR -> hex")
        if len(values) > PCR_COUNT:
            raise AttestationError(f"{where}: more than {PCR_COUNT} PCRs")
        parsed: dict[int, bytes] = {}
        for index, digest in values.items():
            if (
                not isinstance(index, str)
                or not index.isascii()
                or not index.isdigit()
                or len(index) > 2
            ):
                raise AttestationError(f"{where}.{str(index)[:8]}: PCR must be a decimal number")
            pcr = int(index)
            if pcr >= PCR_COUNT or str(pcr) != index:
                raise AttestationError(
                    f"{where}.{index}: PCR must be 0-{PCR_COUNT - 1} without leading zeros"
                )
            if not isinstance(digest, str) or len(digest) != 2 * size or not _HEX.fullmatch(digest):
                raise AttestationError(f"{where}.{index}: must be {2 * size} lower-case hex digits")
            parsed[pcr] = bytes.fromhex(digest)
        result[bank] = parsed
    return result


def collect_evidence(
    client: TpmClient,
    key: AttestationKey,
    selection: Mapping[str, Sequence[int]],
    nonce: bytes,
    event_log: bytes,
    read_ima_log: Callable[[], tuple[bytes, int] | None] | None = None,
    ek_certificate: bytes | None = None,
) -> Evidence:
    """Quote with ``key`` and assemble the document.

    The IMA list is read *after* the quote (``read_ima_log`` returns the list bytes and the index
    of its first entry): the kernel only appends, so the list then holds every measurement the
    quoted PCR 10 includes, possibly followed by newer ones, and the verifier looks for the
    prefix that replays to the quoted value. Read before the quote, a measurement landing in
    between would be in PCR 10 but missing from the list.
    """
    if len(event_log) > MAX_EVENT_LOG_BYTES:
        raise AttestationError(
            f"event log is {len(event_log)} bytes, over the {MAX_EVENT_LOG_BYTES}-byte limit"
        )
    quote = client.quote(key, selection, nonce)
    ima_log: bytes | None = None
    start = 0
    if read_ima_log is not None:
        found = read_ima_log()
        if found is not None:
            ima_log, start = found
            if len(ima_log) > MAX_IMA_LOG_BYTES:
                raise AttestationError(
                    f"IMA list is {len(ima_log)} bytes, over the {MAX_IMA_LOG_BYTES}-byte limit "
                    "of one evidence document: ship only new entries (--ima-from)"
                )
    return Evidence(
        ak_public=key.public,
        quote=quote.attest,
        signature=quote.signature,
        pcrs=quote.pcrs,
        nonce=nonce,
        event_log=event_log,
        ima_log=ima_log,
        ima_start_index=start,
        ek_certificate=ek_certificate,
    )
