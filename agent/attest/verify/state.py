"""The verifier's memory between evidence documents, per AK: the last accepted quote's clock and
how far the IMA list has been replayed.

A small JSON file (the CLI's ``--state``), read and written under an exclusive lock so that two
verifications of the same AK cannot both accept one replayed quote. Every key of the file is
validated: a damaged file is an error naming the key, never a fresh start that would let a
replayed quote through (only a missing file is an empty state).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.attest.reader import read_bounded
from agent.attest.tpm.algorithms import BANKS, PCR_COUNT
from agent.attest.tpm.checks import ClockState
from agent.attest.verify.report import ImaProgress, VerificationReport
from agent.errors import AttestationError

STATE_VERSION: Final = 1
MAX_STATE_BYTES: Final = 16 * 1024 * 1024
_HEX_NAME: Final = re.compile(r"(?:[0-9a-f]{2}){3,66}")


@dataclass
class _AkRecord:
    clock: ClockState
    ima: ImaProgress | None
    updated_at: float


class VerifierState:
    """Per-AK memory of the verifier: the last accepted quote's clock and the IMA replay point.

    Stored as JSON (``--state FILE``)::

        {"version": 1, "aks": {"<AK Name hex>": {
            "clock": 1234, "reset_count": 3, "restart_count": 0, "updated_at": 1700000000.0,
            "ima": {"reset_count": 3, "next_index": 1520, "pcrs": {"sha256": {"10": "<hex>"}}}}}}

    Use :func:`open_state` to read, update and write it under a lock.
    """

    def __init__(self, records: dict[bytes, _AkRecord] | None = None) -> None:
        self._records = records or {}
        self.changed = False

    def clock_state(self, ak_name: bytes | None) -> ClockState | None:
        record = self._records.get(ak_name) if ak_name is not None else None
        return record.clock if record is not None else None

    def ima_progress(self, ak_name: bytes | None) -> ImaProgress | None:
        record = self._records.get(ak_name) if ak_name is not None else None
        return record.ima if record is not None else None

    def record(self, report: VerificationReport) -> bool:
        """Keep the report's clock and IMA state if every check passed; True if kept."""
        if not report.ok or report.clock_state is None:
            return False
        name = report.clock_state.ak_name
        ima_state = report.ima_progress
        if ima_state is None:
            kept = self._records.get(name)
            # An evidence without IMA keeps the replay point of the same boot.
            if (
                kept is not None
                and kept.ima is not None
                and kept.ima.reset_count == report.clock_state.reset_count
            ):
                ima_state = kept.ima
        self._records[name] = _AkRecord(report.clock_state, ima_state, time.time())
        self.changed = True
        return True

    def to_dict(self) -> dict[str, object]:
        aks: dict[str, object] = {}
        for name, record in sorted(self._records.items()):
            entry: dict[str, object] = {
                "clock": record.clock.clock,
                "reset_count": record.clock.reset_count,
                "restart_count": record.clock.restart_count,
                "updated_at": record.updated_at,
            }
            if record.ima is not None:
                entry["ima"] = {
                    "reset_count": record.ima.reset_count,
                    "next_index": record.ima.next_index,
                    "pcrs": {
                        bank: {str(pcr): value.hex() for pcr, value in sorted(values.items())}
                        for bank, values in sorted(record.ima.pcrs.items())
                    },
                }
            aks[name.hex()] = entry
        return {"version": STATE_VERSION, "aks": aks}

    @classmethod
    def from_json(cls, text: bytes, source: str) -> VerifierState:
        def fail(where: str, what: str) -> AttestationError:
            return AttestationError(f"verifier state {source}: {where}: {what}")

        if len(text) > MAX_STATE_BYTES:
            raise fail("file", f"over the {MAX_STATE_BYTES}-byte limit")
        try:
            document = json.loads(text)
        except (ValueError, RecursionError) as error:
            raise fail("file", f"not valid JSON ({error})") from None
        if not isinstance(document, dict) or document.get("version") != STATE_VERSION:
            raise fail("version", f"expected a JSON object with version {STATE_VERSION}")
        aks = document.get("aks")
        if not isinstance(aks, dict):
            raise fail("aks", "must be an object of AK Name -> state")
        records: dict[bytes, _AkRecord] = {}
        for name_hex, entry in aks.items():
            where = f"aks.{name_hex[:16]}"
            if not _HEX_NAME.fullmatch(name_hex) or not isinstance(entry, dict):
                raise fail(where, "must be a hex AK Name mapped to an object")
            name = bytes.fromhex(name_hex)
            numbers = [entry.get(key) for key in ("clock", "reset_count", "restart_count")]
            if not all(type(n) is int and n >= 0 for n in numbers):
                raise fail(where, "clock, reset_count and restart_count must be integers >= 0")
            clock, reset_count, restart_count = (int(n) for n in numbers)  # type: ignore[arg-type]
            updated_at = entry.get("updated_at", 0.0)
            if not isinstance(updated_at, int | float):
                raise fail(f"{where}.updated_at", "must be a number")
            progress = None
            if entry.get("ima") is not None:
                progress = _progress_from_dict(entry["ima"], f"{where}.ima", fail)
            records[name] = _AkRecord(
                ClockState(name, clock, reset_count, restart_count), progress, float(updated_at)
            )
        return cls(records)


def _progress_from_dict(
    document: object, where: str, error: Callable[[str, str], AttestationError]
) -> ImaProgress:
    def fail(what: str) -> AttestationError:
        return error(where, what)

    if not isinstance(document, dict):
        raise fail("must be an object")
    reset_count, next_index = document.get("reset_count"), document.get("next_index")
    if type(reset_count) is not int or type(next_index) is not int:
        raise fail("reset_count and next_index must be integers")
    if reset_count < 0 or next_index < 0:
        raise fail("reset_count and next_index must not be negative")
    pcrs = document.get("pcrs")
    if not isinstance(pcrs, dict):
        raise fail("pcrs must be an object of bank -> PCR -> hex")
    values: dict[str, dict[int, bytes]] = {}
    for bank, by_pcr in pcrs.items():
        if bank not in BANKS or not isinstance(by_pcr, dict):
            raise fail(f"pcrs.{bank[:16]}: unknown bank or not an object")
        size = BANKS[bank].digest_size
        values[bank] = {}
        for pcr, value in by_pcr.items():
            if not (pcr.isascii() and pcr.isdigit()) or int(pcr) >= PCR_COUNT:
                raise fail(f"pcrs.{bank}.{pcr[:8]}: not a PCR number")
            if not isinstance(value, str) or not re.fullmatch(f"[0-9a-f]{{{2 * size}}}", value):
                raise fail(f"pcrs.{bank}.{pcr}: not a {bank} value")
            values[bank][int(pcr)] = bytes.fromhex(value)
    return ImaProgress(reset_count, next_index, values)


def load_state(path: str | Path) -> VerifierState:
    """Read a state file; a missing file is an empty state."""
    text = read_bounded(path, MAX_STATE_BYTES, "verifier state", AttestationError, missing_ok=True)
    if text is None:
        return VerifierState()
    return VerifierState.from_json(text, str(path))


def save_state(state: VerifierState, path: str | Path) -> None:
    """Write atomically (temporary file, fsync, rename), mode 0600."""
    target = Path(path)
    text = json.dumps(state.to_dict(), indent=2, sort_keys=True) + "\n"
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(descriptor, "w") as stream:
                stream.write(text)
                stream.flush()
                os.fsync(stream.fileno())
            Path(temporary).replace(target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as error:
        raise AttestationError(
            f"cannot write verifier state {path}: {error.strerror or error}"
        ) from error


@contextlib.contextmanager
def open_state(path: str | Path) -> Iterator[VerifierState]:
    """Load the state under an exclusive lock (``FILE.lock``) and save it on exit if changed,
    so concurrent verifications of the same AK cannot both accept one replayed quote."""
    lock_path = Path(f"{path}.lock")
    try:
        lock = lock_path.open("a")
    except OSError as error:
        raise AttestationError(
            f"cannot open the verifier state lock {lock_path}: {error.strerror or error}"
        ) from error
    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        state = load_state(path)
        yield state
        if state.changed:
            save_state(state, path)
