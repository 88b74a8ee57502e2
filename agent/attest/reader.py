"""Bounded reading of hostile input: the one byte reader and the one file reader of attest.

Every binary parser of the package (TPM structures in ``tpm/wire.py``, the firmware event log
and Spec ID event in ``logs/``, the IMA list in ``logs/ima.py``) reads through
:class:`ByteReader`, and every file of attestation input (event log, IMA list, evidence, policy,
verifier state) is read with :func:`read_bounded`. Invariants:

* A :class:`ByteReader` never reads past the end of its data and never allocates beyond slices
  of it: every read names how many bytes it needs, and when they are not there it raises the
  *parser's own* exception (the parser passes the factory), so each parser keeps its error type
  and its message format (``offset N: ...``, ``entry N (offset M): ...``, ``TPMT_PUBLIC: ... at
  byte offset N``). Offsets in messages are where the failing read started.
* The bounds themselves (largest log, most events, longest field) are the parsers' own named
  constants, stated at the top of each parser: the reader enforces lengths, not policy.
* :func:`read_bounded` reads at most ``limit + 1`` bytes (through the one bounded file reader,
  ``agent.runtime.inputs.read_prefix``), whatever the file claims (sysfs files
  report size 0, ``/dev/zero`` never ends): one byte more than the limit, so the parser that
  receives it sees the file is too long and says so with its own bound.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal, overload

from agent.runtime.inputs import read_prefix

#: Builds the parser's exception from the offset a read started at and what went wrong there.
ErrorFactory = Callable[[int, str], Exception]


class ByteReader:
    """A bounds-checked cursor over ``data`` reading unsigned integers of one byte order.

    ``error(offset, message)`` makes the exception for every failure. ``shortfall`` words a read
    that needs more bytes than remain, as a ``str.format`` template with the fields ``what``,
    ``needed`` and ``remaining``. ``offset`` starts the cursor inside ``data``.
    """

    __slots__ = ("_byteorder", "_data", "_error", "_shortfall", "offset")

    def __init__(
        self,
        data: bytes,
        *,
        byteorder: Literal["little", "big"],
        error: ErrorFactory,
        shortfall: str,
        offset: int = 0,
    ) -> None:
        self._data = data
        self._byteorder: Literal["little", "big"] = byteorder
        self._error = error
        self._shortfall = shortfall
        self.offset = offset

    @property
    def remaining(self) -> int:
        return len(self._data) - self.offset

    def fail(self, message: str, offset: int | None = None) -> Exception:
        """The parser's exception for ``message`` at ``offset`` (default: the current one)."""
        return self._error(self.offset if offset is None else offset, message)

    def take(self, size: int, what: str) -> bytes:
        start = self.offset
        end = start + size
        if end > len(self._data):
            raise self.fail(
                self._shortfall.format(what=what, needed=size, remaining=self.remaining)
            )
        self.offset = end
        return self._data[start:end]

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), self._byteorder)

    # The fixed sizes skip uint(): the IMA and event log parsers call these per field.
    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), self._byteorder)

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), self._byteorder)

    def u64(self, what: str) -> int:
        return int.from_bytes(self.take(8, what), self._byteorder)

    def rest(self) -> bytes:
        return self.take(self.remaining, "remainder")

    def since(self, start: int) -> bytes:
        """The bytes read from offset ``start`` up to the cursor (a structure's own encoding)."""
        return self._data[start : self.offset]


@overload
def read_bounded(
    path: str | Path,
    limit: int,
    what: str,
    error: Callable[[str], Exception],
    *,
    hint: str = "",
    missing_ok: Literal[False] = False,
) -> bytes: ...


@overload
def read_bounded(
    path: str | Path,
    limit: int,
    what: str,
    error: Callable[[str], Exception],
    *,
    hint: str = "",
    missing_ok: Literal[True],
) -> bytes | None: ...


def read_bounded(
    path: str | Path,
    limit: int,
    what: str,
    error: Callable[[str], Exception],
    *,
    hint: str = "",
    missing_ok: bool = False,
) -> bytes | None:
    """At most ``limit + 1`` bytes of ``path``, read to EOF (see the module docstring).

    A failure raises ``error("cannot read <what> <path>: <reason><hint>")``; with
    ``missing_ok`` a file that does not exist gives None instead.
    """
    try:
        return read_prefix(path, limit)
    except OSError as exc:
        if missing_ok and isinstance(exc, FileNotFoundError):
            return None
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}{hint}") from exc
