"""``accelguard bench health --quick``: the document has every number it promises (values are
not judged: no timing is asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.support import REPO


def test_quick_bench_reports_idle_cost_and_reaction() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "bench", "health", "--quick"],
        capture_output=True, text=True, timeout=300, check=False, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["benchmark"] == "health" and document["gpus"] == 8
    idle = document["idle_cpu_percent"]
    for key in ("without_monitor", "with_monitor", "monitor_extra", "window_s"):
        assert isinstance(idle[key], float) and math.isfinite(idle[key]), key
    reaction = document["xid_to_quarantine"]
    for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms"):
        assert reaction[key] > 0, key
    assert reaction["rounds"] == 3
    assert isinstance(document["aim"]["met"], bool)
