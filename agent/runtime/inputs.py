"""What the CLI is handed, checked before it is used: its arguments, and the JSON files
(certificates, evidence, policies), read bounded and strict.

Arguments must be UTF-8 text (:func:`non_utf8_argument`), and a number of seconds finite and not
negative (:func:`seconds`). A JSON file may come from anywhere, so the reader keeps these
invariants, and every refusal is a :class:`~agent.errors.ValidationError` that names the file and
the limit:

* **Bytes**: at most ``max_bytes`` are ever read. A regular file's size is checked with fstat(2)
  before reading; anything else (a pipe, ``/dev/zero``) is read up to ``max_bytes + 1`` bytes and
  refused there.
* **Shape before objects**: nesting depth and the number of array elements and object members are
  counted by a linear scan of the bytes *before* :mod:`json` builds anything. Memory then grows
  with the item count, not with what 100 MB of ``[{},{},...]`` expands to (about 25 times its
  size as Python objects), and nesting never reaches Python's recursion limit.
* **I-JSON (RFC 7493)** only: UTF-8 (no BOM, no UTF-16/32, which ``json.loads(bytes)`` would
  accept), no duplicate member names (two parsers of one file must not see different values),
  no ``NaN``/``Infinity`` and no number that overflows a double, no unpaired surrogate escapes
  (``"\\ud800"`` decodes to a string that cannot be encoded again).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.errors import ValidationError
from agent.runtime.durations import parse_duration

# Read size for files whose size fstat does not tell (pipes, devices, procfs).
_CHUNK_BYTES: Final = 1024 * 1024

# One token of the shape scan: a string, or a structural character outside strings. A string
# always matches -- to its closing quote, or to the end of the text if unterminated (json then
# refuses the text there) -- and the quantifiers are possessive: the scan never backtracks and
# never restarts inside a string, so it is linear in the size of the text, whatever the text.
# Bytes, not text: UTF-8 multi-byte sequences never contain '"' or '\\', so the tokens are the
# same, and a hostile file is refused before a decoded copy of it exists.
_TOKEN: Final = re.compile(rb'"[^"\\]*+(?:\\.?[^"\\]*+)*+"?|[\[\]{},]', re.DOTALL)


@dataclass(frozen=True)
class JsonLimits:
    """What one kind of document may be; each format states its own (next to its parser)."""

    max_bytes: int
    # Levels of arrays and objects: ``[]`` is depth 1, ``{"a": []}`` depth 2.
    max_depth: int
    # Array elements plus object members over the whole document, an empty array or object
    # counting as one.
    max_items: int


def read_prefix(path: str | Path, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of ``path``, whatever the file claims (sysfs files report size
    0, ``/dev/zero`` never ends): one byte more than the limit tells the caller the file is too
    long. The one bounded file reader; raises OSError. A regular file is read in one call (one
    bytes object, no copy when joined)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    chunks: list[bytes] = []
    total = 0
    try:
        status = os.fstat(descriptor)
        size = status.st_size + 1 if stat.S_ISREG(status.st_mode) else _CHUNK_BYTES
        while total <= limit:
            chunk = os.read(descriptor, min(max(size, 1), limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            size = _CHUNK_BYTES
    finally:
        os.close(descriptor)
    return b"".join(chunks)


def read_bounded(path: Path, max_bytes: int, what: str) -> bytes:
    """The contents of ``path``; refused, unread, if fstat says it is over ``max_bytes``."""
    try:
        status = Path(path).stat()
    except OSError as error:
        raise ValidationError(f"{what} {path}: cannot open: {error.strerror}") from error
    if stat.S_ISREG(status.st_mode) and status.st_size > max_bytes:
        raise ValidationError(
            f"{what} {path}: {status.st_size} bytes, over the {max_bytes}-byte limit"
        )
    try:
        data = read_prefix(path, max_bytes)
    except OSError as error:
        raise ValidationError(f"{what} {path}: cannot read: {error.strerror}") from error
    if len(data) > max_bytes:
        raise ValidationError(f"{what} {path}: more than the {max_bytes}-byte limit")
    return data


def read_json_file(path: Path, limits: JsonLimits, what: str) -> object:
    """Read ``path`` (``what`` names it in errors: "certificate", "evidence") as bounded I-JSON."""
    return parse_json(read_bounded(path, limits.max_bytes, what), limits, f"{what} {path}")


def parse_json(data: bytes, limits: JsonLimits, source: str) -> object:
    """Decode ``data`` as I-JSON within ``limits``; errors start with ``source``."""
    if len(data) > limits.max_bytes:
        raise ValidationError(
            f"{source}: {len(data)} bytes, over the {limits.max_bytes}-byte limit"
        )
    _check_shape(data, limits, source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValidationError(
            f"{source}: not UTF-8 text (byte {error.start}: {error.reason})"
        ) from None
    if text.startswith("\ufeff"):
        raise ValidationError(f"{source}: starts with a byte order mark; JSON text has none")

    def unique_members(pairs: list[tuple[str, object]]) -> dict[str, object]:
        members: dict[str, object] = {}
        for name, value in pairs:
            if name in members:
                raise ValidationError(f"{source}: member name {name[:64]!r} appears twice")
            members[name] = value
        return members

    def no_constant(name: str) -> object:
        raise ValidationError(f"{source}: {name} is not a JSON number")

    def finite_float(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            raise ValidationError(f"{source}: number {literal[:40]} is out of range")
        return value

    try:
        document = json.loads(
            text,
            object_pairs_hook=unique_members,
            parse_constant=no_constant,
            parse_float=finite_float,
        )
    except ValidationError:
        raise
    except (ValueError, RecursionError) as error:
        # JSONDecodeError is a ValueError; so is an integer literal over Python's digit limit.
        # RecursionError cannot happen within the depth limit; kept as a backstop.
        raise ValidationError(f"{source}: not valid JSON: {error}") from None
    _check_strings(document, source)
    return document


def _check_shape(data: bytes, limits: JsonLimits, source: str) -> None:
    depth = items = 0
    for token in _TOKEN.finditer(data):
        # One byte, not token.group(): a string token may be most of a 100 MB document.
        first = data[token.start()]
        if first in b"[{":
            depth += 1
            items += 1
            if depth > limits.max_depth:
                raise ValidationError(f"{source}: nested deeper than {limits.max_depth} levels")
        elif first in b"]}":
            depth -= 1
        elif first == ord(","):
            items += 1
        else:
            continue  # a string
        if items > limits.max_items:
            raise ValidationError(
                f"{source}: more than {limits.max_items} array elements and object members"
            )


def _check_strings(document: object, source: str) -> None:
    """Refuse strings with unpaired surrogates (only a ``\\uD8xx`` escape can make one)."""
    pending = [document]
    while pending:  # a loop, not recursion: the depth is bounded, but need not be small
        value = pending.pop()
        if isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValidationError(
                    f"{source}: a string holds an unpaired surrogate ({value[:40]!r})"
                ) from None


# --- arguments ----------------------------------------------------------------------------------


def seconds(text: str) -> float:
    """An argparse type: a finite, non-negative duration, in seconds or with units (15m, 2h30m)."""
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def non_utf8_argument(arguments: Sequence[str]) -> str | None:
    """Why an argument is refused, or None. Python hands over argv bytes that are not UTF-8 as
    lone surrogates (PEP 383), and those fail only much later -- encoding a protobuf string, a
    JSON document, a log line -- with a traceback."""
    encoding = sys.getfilesystemencoding()
    for position, argument in enumerate(arguments, start=1):
        try:
            # The bytes as given (what os.fsencode returns, in any locale) must be UTF-8.
            raw = argument.encode(encoding, "surrogateescape")
            raw.decode("utf-8")
            continue
        except UnicodeEncodeError:  # a surrogate no byte decodes to: passed in, not from argv
            raw = argument.encode("utf-8", "backslashreplace")
        except UnicodeDecodeError:
            pass
        after = ""
        if position > 1 and arguments[position - 2].startswith("-"):
            after = f" (after {arguments[position - 2][:40]})"
        return (
            f"argument {position}, {raw[:60]!r}{after}, is not valid UTF-8; "
            "arguments must be UTF-8 text"
        )
    return None
