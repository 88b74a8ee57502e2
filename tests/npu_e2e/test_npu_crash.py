"""SIGKILL the agent at the layout and lease failpoints on a simulated 910 node, as the MIG crash
tests do: after a restart the vNPU layout converges and no partition is free and dirty, no
revoked tenant reaches an NPU node, no holder is left."""

from __future__ import annotations

import errno
import signal
from collections import Counter
from pathlib import Path

import pytest

from agent.runtime.failpoints import ENVIRONMENT_VARIABLE, CrashPoint
from agent.store import Store
from tests.layouts_desired.conftest import start_up_outcomes
from tests.leases.helpers import any_tenant_cgroup, hold, reap
from tests.npu_e2e.test_vnpu_layout_and_fence import dcmi_calls, npu_nodes, vnpus
from tests.support import RunningAgent, probe, wait_all_clean, wait_settled

# The steps a vNPU apply has (no GPU/compute instance pair, so no orphan to complete).
LAYOUT_POINTS = [
    CrashPoint.LAYOUT_BEFORE_DESTROY, CrashPoint.LAYOUT_AFTER_DESTROY,
    CrashPoint.LAYOUT_BEFORE_CREATE, CrashPoint.LAYOUT_AFTER_CREATE,
]  # fmt: skip
LEASE_POINTS = sorted(p for p in CrashPoint if p.startswith(("lease.", "scrub.after")))
START = ["vir08=2"]
TARGET = ["vir16=1", "vir08=1"]


def _restart_with(agent: RunningAgent, point: str) -> None:
    agent.stop(signal.SIGTERM)
    agent.start(env={ENVIRONMENT_VARIABLE: point})


def _settled_safely(agent: RunningAgent) -> None:
    for partition in wait_settled(agent):
        assert partition["state"] in ("free", "quarantined")
        assert partition["state"] != "free" or partition["clean"]
        assert not partition["holder"]


@pytest.mark.parametrize("point", LAYOUT_POINTS)
def test_crash_during_vnpu_layout_converges(npu910_agent: RunningAgent, point: str) -> None:
    agent = npu910_agent
    agent.cli_json("layout", "apply", "--npu", "0", *START)
    wait_all_clean(agent)
    _restart_with(agent, point)
    assert agent.cli("layout", "apply", "--npu", "0", *TARGET).returncode != 0
    assert agent.wait_exit() == -signal.SIGKILL, f"{point} was not reached"

    # The start-up re-apply of the desired layout (recorded before the crash) converges. The
    # admin socket answers before it is done: wait for its outcome, then for the scrubs.
    agent.start()
    start_up_outcomes(agent, expected=1)
    _settled_safely(agent)
    assert Counter(p["profile"] for p in vnpus(agent, 0)) == Counter({"vir16": 1, "vir08": 1})
    before = dcmi_calls(agent)
    again = agent.cli_json("layout", "apply", "--npu", "0", *TARGET)
    assert again["gpus"][0]["noop"] is True
    assert dcmi_calls(agent) == before
    store = Store(agent.config.node.store_path)
    try:
        assert store.unfinished_layouts() == []
    finally:
        store.close()


@pytest.mark.parametrize("point", LEASE_POINTS)
def test_crash_during_vnpu_lease(
    npu910_agent: RunningAgent, cgroup_parents: dict[str, Path], point: str
) -> None:
    agent = npu910_agent
    agent.cli_json("layout", "apply", "--npu", "0", "vir08=1")
    wait_all_clean(agent)
    cgroup = any_tenant_cgroup(cgroup_parents, "t")
    holders = []
    if point.startswith("lease.grant."):
        _restart_with(agent, point)
        grant = agent.cli(
            "lease", "grant", "--tenant", "t", "--profile", "vir08", "--cgroup", str(cgroup)
        )
        assert grant.returncode != 0
    else:
        lease = agent.cli_json(
            "lease", "grant", "--tenant", "t", "--profile", "vir08", "--cgroup", str(cgroup)
        )
        holders.append(hold(agent, lease["partition"]["uuid"], "--cgroup", str(cgroup)))
        _restart_with(agent, point)
        assert agent.cli("lease", "release", lease["lease"]["id"]).returncode != 0
    assert agent.wait_exit() == -signal.SIGKILL, f"{point} was not reached"

    agent.start()
    _settled_safely(agent)
    denied = probe(cgroup, npu_nodes(agent))
    assert set(denied.values()) == {errno.EPERM}, denied
    for process in holders:
        assert reap(process) < 0  # evicted, not exited on its own
    leases = agent.cli_json("lease", "list", "--all")["leases"]
    assert leases and all(lease["state"] == "released" for lease in leases)
