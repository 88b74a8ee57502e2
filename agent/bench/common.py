"""Timing and summaries shared by every benchmark: the one place a number is measured or reduced;
and the agent under test as a process (start, wait until it answers, wait for clean partitions).

Each benchmark reports ratios to a baseline measured in the same run, not absolute times: a noisy
CI machine slows both sides alike. Measured work and its baseline alternate round by round, so
drift on a shared machine hits both alike too.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.errors import AccelguardError, ValidationError


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command: state is field 3, utime and stime fields 14 and 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the agent under test, as a process ---------------------------------------------------------


def start_agent(config_path: Path, log: Path | None = None) -> subprocess.Popen[bytes]:
    """``accelguard --config CONFIG agent`` as a child (its output to ``log``, or discarded)."""
    command = [sys.executable, "-m", "agent.cli", "--config", str(config_path), "agent"]
    if log is None:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def wait_for_agent(client: Any, agent: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Until the agent answers ``client.ping()``; ValidationError if it exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            raise ValidationError(f"the agent exited with {agent.returncode}")
        try:
            client.ping()
        except AccelguardError:
            time.sleep(0.05)
        else:
            return
    raise ValidationError(f"the agent did not start within {timeout:.0f} s")


def all_clean(client: Any) -> bool:
    partitions = client.list_partitions().partitions
    return bool(partitions) and all(p.state == "free" and p.clean for p in partitions)


def wait_all_clean(client: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all_clean(client):
            return
        time.sleep(0.05)
    raise ValidationError(f"partitions did not become clean within {timeout:.0f} s")


def bench_scratch(stack: contextlib.ExitStack, directory: Path | None, prefix: str) -> Path:
    """The bench's working directory (a short temp dir unless given: admin sockets must fit
    sun_path) and stdout kept for the JSON document (the node side logs to stdout unless
    configured), both undone when ``stack`` closes."""
    import tempfile  # noqa: PLC0415

    stack.enter_context(contextlib.redirect_stdout(sys.stderr))
    if directory is None:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
    directory.mkdir(parents=True, exist_ok=True)
    return directory
