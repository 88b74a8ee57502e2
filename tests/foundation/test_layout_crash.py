"""SIGKILL the agent at every step of a layout apply; after a restart the next apply converges."""

from __future__ import annotations

import signal
from collections import Counter
from typing import Any

import pytest

from agent.runtime.failpoints import ENVIRONMENT_VARIABLE, CrashPoint
from agent.store import Store
from tests.support import RunningAgent

LAYOUT_POINTS = sorted(point for point in CrashPoint if point.startswith("layout."))
# tests/foundation/test_failpoints.py checks that the crash tests together cover every point.
COVERED = frozenset(LAYOUT_POINTS)
START = ["3g.40gb=2"]
TARGET = ["3g.40gb=1", "1g.10gb=3"]


def _crash_at(running: RunningAgent, point: str, layout: list[str]) -> None:
    running.stop(signal.SIGTERM)
    running.start(env={ENVIRONMENT_VARIABLE: point})
    result = running.cli("layout", "apply", "--gpu", "0", *layout)
    assert result.returncode != 0, f"{point} was not reached"
    assert running.wait_exit() == -signal.SIGKILL


def _check_converged(status: dict[str, Any]) -> None:
    instances = status["gpus"][0]["instances"]
    assert Counter(i["profile"] for i in instances) == Counter({"3g.40gb": 1, "1g.10gb": 3})
    assert all(i["uuid"].startswith("MIG-") for i in instances), "a GPU instance has no CI"
    gi_ids = [i["gpu_instance_id"] for i in instances]
    assert len(gi_ids) == len(set(gi_ids))
    slices = [
        s
        for i in instances
        for s in range(i["placement_start"], i["placement_start"] + i["placement_size"])
    ]
    assert len(slices) == len(set(slices)), "overlapping placements"
    mig_partitions = [p for p in status["partitions"] if p["kind"] == "mig" and p["gpu_index"] == 0]
    assert sorted(p["uuid"] for p in mig_partitions) == sorted(i["uuid"] for i in instances)


def test_every_layout_step_has_a_failpoint() -> None:
    assert set(LAYOUT_POINTS) >= {
        "layout.before_destroy",
        "layout.after_destroy",
        "layout.before_create",
        "layout.between_gi_and_ci",
        "layout.after_create",
        "layout.before_complete_orphan",
    }


@pytest.mark.parametrize("point", LAYOUT_POINTS)
def test_crash_then_reapply_converges(agent: RunningAgent, point: str) -> None:
    agent.cli_json("layout", "apply", "--gpu", "0", *START)
    if point == "layout.before_complete_orphan":
        # Leave a GPU instance without its compute instance first, then crash while completing
        # it: the agent's start-up re-apply of the desired layout (TARGET, recorded before the
        # first crash) is what completes it (docs/layouts.md "The desired layout").
        _crash_at(agent, "layout.between_gi_and_ci", TARGET)
        agent.start(env={ENVIRONMENT_VARIABLE: point}, wait=False)
        assert agent.wait_exit() == -signal.SIGKILL, f"{point} was not reached"
    else:
        _crash_at(agent, point, TARGET)

    agent.start()
    agent.cli_json("layout", "apply", "--gpu", "0", *TARGET)
    _check_converged(agent.cli_json("status"))
    # Converged means converged: one more apply does nothing at all.
    before = agent.mutating_calls()
    assert agent.cli_json("layout", "apply", "--gpu", "0", *TARGET)["gpus"][0]["noop"] is True
    assert agent.mutating_calls() == before
    store = Store(agent.config.node.store_path)
    try:
        assert store.unfinished_layouts() == []
    finally:
        store.close()
