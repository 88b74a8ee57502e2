"""Timing and summaries shared by every benchmark: the one place a number is measured or reduced.

Each benchmark reports ratios to a baseline measured in the same run, not absolute times: a noisy
CI machine slows both sides alike. Measured work and its baseline alternate round by round, so
drift on a shared machine hits both alike too.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def elapsed(body: Callable[[], object]) -> float:
    """Seconds one call of ``body`` takes."""
    start = time.perf_counter()
    body()
    return time.perf_counter() - start


def median_seconds(rounds: int, body: Callable[[], object]) -> float:
    return statistics.median(elapsed(body) for _ in range(rounds))


def interleaved(
    rounds: int, measured: Callable[[], object], baseline: Callable[[], object]
) -> tuple[list[float], list[float]]:
    """Seconds of each round of ``measured`` and of ``baseline``, alternating."""
    ours: list[float] = []
    base: list[float] = []
    for _ in range(rounds):
        ours.append(elapsed(measured))
        base.append(elapsed(baseline))
    return ours, base


def interleaved_medians(
    rounds: int, measured: Callable[[], object], baseline: Callable[[], object]
) -> tuple[float, float]:
    """Median seconds of each, alternating (:func:`interleaved`)."""
    ours, base = interleaved(rounds, measured, baseline)
    return statistics.median(ours), statistics.median(base)


def latency(samples: Sequence[float]) -> dict[str, float]:
    """Percentiles and mean of ``samples`` (seconds), in milliseconds."""
    ordered = sorted(samples)

    def at(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] * 1000

    return {
        "p50_ms": statistics.median(ordered) * 1000,
        "p90_ms": at(0.9),
        "p99_ms": at(0.99),
        "mean_ms": statistics.fmean(ordered) * 1000,
    }


def bytes_per_second(size: int, samples: Sequence[float]) -> float:
    """``size`` bytes over the median of ``samples`` seconds."""
    return size / statistics.median(samples)
