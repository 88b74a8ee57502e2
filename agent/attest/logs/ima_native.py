"""The native fast path of binary IMA lists: ``libaccelguard-ima.so`` (native/imafast), by ctypes.

What it keeps:

* The Python parser (``ima.py``) and replay loop (``ima_log.py``) are the reference. The library
  answers only when it is sure: on any doubt (a bank it does not hash, a malformed length, a
  template hash mismatch, a template whose field count ``template_field_ids`` refuses, more
  entries than ``MAX_ENTRIES``) :func:`scan` returns None and the Python parser runs on the same
  bytes, so every result and every error message is the Python code's.
* A list the library accepted is a :class:`NativeImaLog`: the input bytes and a table of 16
  bytes per entry, from which the ``EntryRow`` tuples are built only when something needs rows
  (``entries``, equality). Replay of the whole list or of its tail, with or without a trace,
  and the template-hash check run in C over the same table; any call the C code does not take
  (another bank, a start or starting value the Python code refuses) goes to ``ImaLog``'s own.
* Nothing here raises on a missing or broken library: it is looked up once, at first use
  (``ACCELGUARD_IMA_LIB``, else ``native/imafast/build/libaccelguard-ima.so`` in the checkout
  this module runs from, built by ``make native``); when it is absent, fails to load or has
  another ABI version, that is logged once at debug level and the pure-Python path runs.
  :func:`use_native` switches the fast path off and on (the differential tests run both).
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path
from typing import Final, NamedTuple

import structlog

from agent.attest.logs.ima_log import (
    IMA_DEFAULT_PCR,
    EntryRow,
    ImaEntry,
    ImaLog,
    ima_template_input,
    template_field_ids,
)
from agent.attest.tpm.algorithms import BANKS, HashAlgorithm

log = structlog.get_logger(__name__)

LIBRARY_ENV: Final = "ACCELGUARD_IMA_LIB"
LIBRARY_NAME: Final = "libaccelguard-ima.so"
CHECKOUT_LIBRARY: Final = (
    Path(__file__).resolve().parents[3] / "native" / "imafast" / "build" / LIBRARY_NAME
)
# The banks the library hashes (OpenSSL EVP); the others replay in Python.
NATIVE_BANKS: Final = frozenset({"sha1", "sha256", "sha384", "sha512"})

# Must match imafast.c: AG_ABI_VERSION, struct ag_entry, struct ag_template, AG_NOT_HANDLED.
_ABI_VERSION: Final = 1
_ENTRY: Final = struct.Struct("=IIIBBH")
_TEMPLATE: Final = struct.Struct("=IIII")
_KIND_IMA: Final = 1
_NOT_HANDLED: Final = -1
# The smallest entry: PCR, template hash, a 1-byte name with its length, an empty data length.
_MIN_ENTRY_BYTES: Final = 4 + 4 + 1 + 4
# Distinct template names one list may have for the fast path (a real list has one to three).
_MAX_TEMPLATES: Final = 64
_IMA_DIGEST_BYTES: Final = 20


class Limits(NamedTuple):
    """The parser's bounds for hostile input (``ima.py`` holds their values)."""

    max_entries: int
    pcr_count: int
    max_name: int
    max_data: int
    max_fields: int
    max_ima_name: int


class _Limits(ctypes.Structure):
    _fields_ = tuple((name, ctypes.c_uint32) for name in Limits._fields)


class _Summary(ctypes.Structure):
    _fields_ = (
        ("pcr_mask", ctypes.c_uint32),
        ("violations", ctypes.c_uint32),
        ("template_count", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    )


_library: ctypes.CDLL | None = None
_looked_up = False
_enabled = True


def library_path() -> Path:
    """Where the library is looked for: ``$ACCELGUARD_IMA_LIB``, else the checkout's build."""
    configured = os.environ.get(LIBRARY_ENV)
    return Path(configured) if configured else CHECKOUT_LIBRARY


def library() -> ctypes.CDLL | None:
    """The loaded library, or None (absent, unloadable, another ABI): looked up once."""
    global _library, _looked_up  # noqa: PLW0603 - one lookup per process, like a cached import
    if _looked_up:
        return _library
    path = library_path()
    try:
        loaded = ctypes.CDLL(str(path))
        version = int(loaded.accelguard_ima_abi())
        if version == _ABI_VERSION:
            _declare(loaded)
            _library = loaded
        reason = f"ABI version {version}, this code needs {_ABI_VERSION}"
    except (OSError, AttributeError) as error:
        reason = str(error)
    if _library is None:
        log.debug("ima_native_unavailable", path=str(path), reason=reason)
    # Two threads looking up at once both load it; either result is the same library.
    _looked_up = True
    return _library


def use_native(enabled: bool) -> bool:
    """Switch the fast path on or off for lists parsed from now on; returns the old setting."""
    global _enabled
    previous, _enabled = _enabled, enabled
    return previous


def active() -> bool:
    """Whether lists parsed now go through the library."""
    return _enabled and library() is not None


def _declare(loaded: ctypes.CDLL) -> None:
    size, pointer, buffer = ctypes.c_size_t, ctypes.c_void_p, ctypes.c_char_p
    loaded.accelguard_ima_scan.restype = ctypes.c_int64
    loaded.accelguard_ima_scan.argtypes = [
        buffer, size, ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Limits),
        pointer, size, pointer, size, ctypes.POINTER(_Summary),
    ]  # fmt: skip
    loaded.accelguard_ima_replay.restype = ctypes.c_int64
    loaded.accelguard_ima_replay.argtypes = [
        buffer, size, buffer, size, size, ctypes.c_int, ctypes.c_int, ctypes.c_uint32,
        ctypes.c_int, pointer, pointer, pointer,
    ]  # fmt: skip
    loaded.accelguard_ima_mismatches.restype = ctypes.c_int64
    loaded.accelguard_ima_mismatches.argtypes = [
        buffer, size, buffer, size, ctypes.c_int, pointer, pointer,
    ]  # fmt: skip


def _out(buffer: bytearray) -> ctypes.Array[ctypes.c_char]:
    """A zero-copy ctypes view of ``buffer`` for the library to write into."""
    return (ctypes.c_char * len(buffer)).from_buffer(buffer)


def scan(
    raw: bytes, listed: HashAlgorithm, verify: bool, limits: Limits, first_index: int
) -> NativeImaLog | None:
    """The list ``raw`` (template hashes in ``listed``) parsed natively, its template hashes
    checked when ``verify``; None when the Python parser must decide."""
    loaded = library()
    if not _enabled or loaded is None or listed.name not in NATIVE_BANKS:
        return None
    capacity = min(limits.max_entries, len(raw) // (_MIN_ENTRY_BYTES + listed.digest_size)) + 1
    entries = bytearray(capacity * _ENTRY.size)
    templates = bytearray(_MAX_TEMPLATES * _TEMPLATE.size)
    summary = _Summary()
    count = int(
        loaded.accelguard_ima_scan(
            raw,
            len(raw),
            listed.algorithm_id,
            int(verify),
            ctypes.byref(_Limits(*limits)),
            _out(entries),
            capacity,
            _out(templates),
            _MAX_TEMPLATES,
            ctypes.byref(summary),
        )
    )
    if count == _NOT_HANDLED:
        return None
    named: list[tuple[str, tuple[str, ...] | None]] = []
    for name_at, name_size, field_count, varies in _TEMPLATE.iter_unpack(
        templates[: summary.template_count * _TEMPLATE.size]
    ):
        # The library checked the characters; which field counts a name allows is ours.
        name = raw[name_at : name_at + name_size].decode("ascii")
        field_ids = template_field_ids(name)
        if field_ids is not None and (varies or len(field_ids) != field_count):
            return None
        named.append((name, field_ids))
    table = bytes(memoryview(entries)[: count * _ENTRY.size])
    native = _Table(loaded, raw, table, count, listed, named)
    pcrs = frozenset(pcr for pcr in range(limits.pcr_count) if summary.pcr_mask >> pcr & 1)
    return NativeImaLog(native, pcrs, summary.violations, first_index)


class NativeImaLog(ImaLog):
    """A binary list the library accepted; the same answers as the ``ImaLog`` the Python parser
    builds from the same bytes."""

    __slots__ = ("_built", "_native", "_pcrs", "_violations")

    def __init__(
        self, native: _Table, pcrs: frozenset[int], violations: int, first_index: int
    ) -> None:
        super().__init__(
            (), "binary", first_index=first_index, template_hash_bank=native.listed.name
        )
        self._native = native
        self._built = False
        self._pcrs = pcrs
        self._violations = violations

    def __len__(self) -> int:
        return self._native.count

    def _table(self) -> tuple[EntryRow, ...]:
        if not self._built:
            self._rows = self._native.rows()
            self._built = True
        return self._rows

    @property
    def violations(self) -> int:
        return self._violations

    @property
    def pcrs(self) -> frozenset[int]:
        return self._pcrs

    def replayable_banks(self) -> tuple[str, ...]:
        # A binary list carries every entry's template data.
        return tuple(BANKS)

    def template_hash_mismatches(self) -> list[tuple[ImaEntry, bytes]]:
        found = self._native.mismatches()
        if found is None:
            return super().template_hash_mismatches()
        return [(self._entry(position), computed) for position, computed in found]

    def replay(
        self,
        bank_name: str = "sha1",
        *,
        pcr: int = IMA_DEFAULT_PCR,
        start_index: int | None = None,
        starting_pcr: bytes | None = None,
        legacy_padded_sha1: bool = False,
    ) -> bytes:
        done = self._replay(bank_name, pcr, start_index, starting_pcr, legacy_padded_sha1, None)
        if done is not None:
            return done
        return super().replay(
            bank_name,
            pcr=pcr,
            start_index=start_index,
            starting_pcr=starting_pcr,
            legacy_padded_sha1=legacy_padded_sha1,
        )

    def replay_trace(
        self,
        bank_name: str,
        *,
        pcr: int = IMA_DEFAULT_PCR,
        start_index: int | None = None,
        starting_pcr: bytes | None = None,
        legacy_padded_sha1: bool = False,
    ) -> list[tuple[int, bytes]]:
        trace: list[tuple[int, bytes]] = []
        done = self._replay(bank_name, pcr, start_index, starting_pcr, legacy_padded_sha1, trace)
        if done is not None:
            return trace
        return super().replay_trace(
            bank_name,
            pcr=pcr,
            start_index=start_index,
            starting_pcr=starting_pcr,
            legacy_padded_sha1=legacy_padded_sha1,
        )

    def _replay(
        self,
        bank_name: str,
        pcr: int,
        start_index: int | None,
        starting_pcr: bytes | None,
        legacy_padded_sha1: bool,
        trace: list[tuple[int, bytes]] | None,
    ) -> bytes | None:
        """The replay in C, or None for a call it does not take: another bank, or arguments
        the Python replay refuses (it words the error)."""
        target = BANKS.get(bank_name)
        start = self.first_index if start_index is None else start_index
        if (
            target is None
            or target.name not in NATIVE_BANKS
            or not isinstance(pcr, int)
            or not 0 <= pcr < 2**32
            or not self.first_index <= start <= self.first_index + len(self)
            or (starting_pcr is not None and len(starting_pcr) != target.digest_size)
        ):
            return None
        value = bytes(target.digest_size) if starting_pcr is None else bytes(starting_pcr)
        begin = start - self.first_index
        return self._native.replay(
            target, pcr, begin, value, legacy_padded_sha1, trace, self.first_index
        )


class _Table:
    """The input and the library's table of its entries (16 bytes each)."""

    __slots__ = ("_library", "_raw", "_table", "_templates", "count", "listed")

    def __init__(
        self,
        loaded: ctypes.CDLL,
        raw: bytes,
        table: bytes,
        count: int,
        listed: HashAlgorithm,
        templates: list[tuple[str, tuple[str, ...] | None]],
    ) -> None:
        self._library = loaded
        self._raw = raw
        self._table = table
        self.count = count
        self.listed = listed
        self._templates = templates

    def rows(self) -> tuple[EntryRow, ...]:
        """The rows ``ima.py``'s parser builds from the same bytes."""
        raw, templates = self._raw, self._templates
        hash_end = 4 + self.listed.digest_size
        rows: list[EntryRow] = []
        append = rows.append
        for offset, data_at, size, pcr, kind, template in _ENTRY.iter_unpack(self._table):
            name, field_ids = templates[template]
            template_hash = raw[offset + 4 : offset + hash_end]
            if kind != _KIND_IMA:
                data = raw[data_at : data_at + size]
                append((offset, pcr, template_hash, name, data, None, field_ids, True))
                continue
            digest = raw[data_at : data_at + _IMA_DIGEST_BYTES]
            name_at = data_at + _IMA_DIGEST_BYTES + 4
            file_name = raw[name_at : name_at + size] + b"\x00"
            hash_input = ima_template_input(digest, file_name)
            append(
                (offset, pcr, template_hash, name, hash_input, (digest, file_name), field_ids, True)
            )
        return tuple(rows)

    def replay(
        self,
        target: HashAlgorithm,
        pcr: int,
        begin: int,
        value: bytes,
        legacy_padded_sha1: bool,
        trace: list[tuple[int, bytes]] | None,
        first_index: int,
    ) -> bytes | None:
        """``value`` extended in ``target`` with the entries from position ``begin`` on that
        extend ``pcr`` (``ima_log._fold``'s rules), each traced as (``first_index`` +
        position, value after it); None if the library refused."""
        size = target.digest_size
        room = self.count - begin if trace is not None else 0
        values, positions = bytearray(room * size), bytearray(room * 4)
        into = ctypes.create_string_buffer(value, size)
        extends = int(
            self._library.accelguard_ima_replay(
                self._raw,
                len(self._raw),
                self._table,
                self.count,
                begin,
                self.listed.algorithm_id,
                target.algorithm_id,
                pcr,
                int(legacy_padded_sha1),
                into,
                _out(values) if room else None,
                _out(positions) if room else None,
            )
        )
        if extends == _NOT_HANDLED:
            return None
        if trace is not None and extends:
            after = bytes(values)
            indices = memoryview(positions).cast("I")[:extends].tolist()
            if first_index:
                indices = [first_index + position for position in indices]
            values_after = [after[at : at + size] for at in range(0, extends * size, size)]
            trace.extend(zip(indices, values_after, strict=True))
        return into.raw

    def mismatches(self) -> list[tuple[int, bytes]] | None:
        """(position, computed hash) of the non-violation entries whose data does not hash to
        their template hash; None if the library refused."""
        size = self.listed.digest_size
        room = max(self.count, 1)
        positions, computed = bytearray(room * 4), bytearray(room * size)
        found = int(
            self._library.accelguard_ima_mismatches(
                self._raw,
                len(self._raw),
                self._table,
                self.count,
                self.listed.algorithm_id,
                _out(positions),
                _out(computed),
            )
        )
        if found == _NOT_HANDLED:
            return None
        where = memoryview(positions).cast("I")
        return [(where[n], bytes(computed[n * size : (n + 1) * size])) for n in range(found)]
