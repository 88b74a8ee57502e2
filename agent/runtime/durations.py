"""Durations as people write and read them: ``90``, ``90s``, ``15m``, ``2h30m``, ``30d``.

:func:`parse_duration` takes a plain number of seconds or units run together (d, h, m, s, ms);
:func:`human_duration` gives the short form back (``2592000`` is ``30d``, ``5400.5`` is
``1h30m0.5s``), for tables and error messages that otherwise print ``2.592e+06s``.
"""

from __future__ import annotations

import math
import re
from typing import Final

_UNITS: Final = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)")
_WHOLE: Final = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|d|h|m|s))+")


def parse_duration(text: str) -> float:
    """Seconds; ValueError saying what is accepted when ``text`` is not a finite, non-negative
    duration."""
    cleaned = text.strip()
    try:
        value = float(cleaned)
    except ValueError:
        if not _WHOLE.fullmatch(cleaned):
            raise ValueError(
                f"{text!r} is not a duration: give seconds (90) or units such as 90s, 15m, 2h30m, "
                "30d"
            ) from None
        value = sum(float(number) * _UNITS[unit] for number, unit in _PART.findall(cleaned))
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r}: give a finite, non-negative duration")
    return value


def human_duration(seconds: float) -> str:
    """``30d``, ``1h30m``, ``45s``, ``0.25s``; whole units from days down, the seconds to at most
    three decimals. Not finite or negative: the number as given."""
    if not math.isfinite(seconds) or seconds < 0:
        return f"{seconds}s"
    whole = int(seconds)
    fraction = round(seconds - whole, 3)
    if fraction >= 1:  # 59.9996 rounds up
        whole, fraction = whole + 1, 0.0
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        count, whole = divmod(whole, size)
        if count:
            parts.append(f"{count}{unit}")
    if whole or fraction or not parts:
        text = f"{whole + fraction:.3f}".rstrip("0").rstrip(".")
        parts.append(f"{text}s")
    return "".join(parts)
