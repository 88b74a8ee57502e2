"""What a node reads to build its evidence: the PCR selection it quotes, the firmware event log
and the part of the IMA list the verifier lacks. Used by ``accelguard attest quote`` and by the
agent when the controller asks for a quote (agent/link/attestation.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

from agent.attest.evidence import MAX_EVENT_LOG_BYTES, MAX_IMA_LOG_BYTES
from agent.attest.logs import ima
from agent.attest.reader import read_bounded
from agent.attest.tpm.algorithms import PCR_COUNT
from agent.attest.tpm.wire import normalise_selection
from agent.errors import AttestationError, QuoteError, ValidationError

SELECTION_SYNTAX: Final = "BANK:I,J,K-L[+BANK:...], e.g. sha256:0-7,14+sha1:0-7"
_SELECTION_PART: Final = re.compile(r"([a-z0-9_]+):([0-9,\-]+)")


def parse_pcr_selection(text: str, what: str = "--pcrs") -> dict[str, list[int]]:
    """``sha256:0-7,14+sha1:0`` -> ``{"sha256": [0..7, 14], "sha1": [0]}``."""
    selection: dict[str, list[int]] = {}
    for part in text.split("+"):
        match = _SELECTION_PART.fullmatch(part.strip())
        if match is None:
            raise ValidationError(f"{what} {text!r}: expected {SELECTION_SYNTAX}")
        bank = match.group(1)
        if bank in selection:
            raise ValidationError(f"{what} {text!r}: bank {bank} is listed twice")
        selection[bank] = _parse_indices(match.group(2), text, what)
    check_selection(selection, f"{what} {text!r}")
    return selection


def check_selection(selection: dict[str, list[int]], what: str) -> None:
    try:
        normalise_selection(selection)
    except QuoteError as error:
        raise ValidationError(f"{what}: {error}") from None
    for bank, indices in selection.items():
        if not indices or max(indices) >= PCR_COUNT:
            raise ValidationError(f"{what}: PCRs of {bank} must be 0 to {PCR_COUNT - 1}")


def _parse_indices(text: str, whole: str, what: str) -> list[int]:
    indices: set[int] = set()
    for item in text.split(","):
        low, _, high = item.partition("-")
        if not low.isdigit() or (high and not high.isdigit()) or len(low) > 2 or len(high) > 2:
            raise ValidationError(f"{what} {whole!r}: {item!r} is not a PCR index or range")
        first, last = int(low), int(high or low)
        if first > last:
            raise ValidationError(f"{what} {whole!r}: range {item!r} runs backwards")
        indices.update(range(first, last + 1))
    return sorted(indices)


def read_limited(path: Path, limit: int, what: str) -> bytes:
    data = read_bounded(path, limit, what, AttestationError)
    if len(data) > limit:
        raise AttestationError(f"{what} {path} is over the {limit}-byte limit")
    return data


def read_event_log(path: Path) -> bytes:
    return read_limited(path, MAX_EVENT_LOG_BYTES, "event log")


def read_ima_tail(path: Path, first: int) -> tuple[bytes, int]:
    """The binary list from entry ``first`` on: the agent ships only what the verifier lacks."""
    data = read_limited(path, ima.MAX_LOG_BYTES, "IMA list")
    if first == 0:
        if len(data) > MAX_IMA_LOG_BYTES:
            raise AttestationError(
                f"IMA list {path} is {len(data)} bytes, over the {MAX_IMA_LOG_BYTES}-byte "
                "limit of one evidence document: ship only new entries (--ima-from)"
            )
        return data, 0
    entries = ima.parse_ima_binary(data, verify_template_hashes=False).entries
    if first > len(entries):
        raise ValidationError(f"IMA from entry {first}: the list has only {len(entries)} entries")
    offset = entries[first].offset if first < len(entries) else len(data)
    return data[offset:], first
