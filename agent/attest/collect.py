"""What a node reads to build its evidence: the firmware event log and the part of the IMA list
the verifier lacks. Used by ``accelguard attest quote`` and by the agent when the controller asks
for a quote (agent/link/attestation.py)."""

from __future__ import annotations

from pathlib import Path

from agent.attest.evidence import MAX_EVENT_LOG_BYTES, MAX_IMA_LOG_BYTES
from agent.attest.logs import ima
from agent.attest.reader import read_bounded
from agent.errors import AttestationError, ValidationError


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
        raise ValidationError(f"--ima-from {first}: the list has only {len(entries)} entries")
    offset = entries[first].offset if first < len(entries) else len(data)
    return data[offset:], first
