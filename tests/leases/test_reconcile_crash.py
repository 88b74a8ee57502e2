"""SIGKILL the agent at every step of the reconciler; restart; check the lease invariants plus
invariant 7: no node a partition owns is allowed in two tenants' fences."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest

from agent.isolation import fence_for
from agent.isolation.rules import DeviceRule
from agent.isolation.survey import survey_fences
from agent.runtime.failpoints import ENVIRONMENT_VARIABLE, CrashPoint
from tests.leases.helpers import (
    any_tenant_cgroup,
    behind_our_back,
    grant,
    layout_clean,
    lease_state,
)
from tests.support import RunningAgent, all_gpu_nodes, probe, wait_all_clean, wait_settled

LOST_POINTS = sorted(p for p in CrashPoint if p.startswith("reconcile.lost."))
ORPHAN_POINTS = sorted(p for p in CrashPoint if p.startswith("reconcile.orphan."))
# tests/foundation/test_failpoints.py checks that the crash tests together cover every point.
COVERED = frozenset([*LOST_POINTS, *ORPHAN_POINTS])


def _own_rdevs(partition: dict[str, object]) -> set[tuple[int, int]]:
    nodes = [Path(str(p)) for p in partition["device_nodes"]]  # type: ignore[attr-defined]
    caps = [n for n in nodes if n.parent.name == "nvidia-caps"]
    own = caps or [n for n in nodes if n.name.startswith("nvidia") and n.name[6:].isdigit()]
    return {(os.major(n.stat().st_rdev), os.minor(n.stat().st_rdev)) for n in own}


def _check_invariants(agent: RunningAgent, parents: dict[str, Path]) -> list[dict[str, object]]:
    partitions = wait_settled(agent)
    for partition in partitions:
        assert partition["state"] in ("free", "quarantined")
        assert partition["state"] != "free" or partition["clean"]
        assert partition["state"] != "quarantined" or partition["reason"]
    fences, problems = survey_fences(list(parents.values()))
    assert not problems
    for partition in agent.cli_json("partition", "list")["partitions"]:
        for major, minor in _own_rdevs(partition):
            allowing = [f.cgroup for f in fences if f.allows("c", major, minor)]
            assert len(allowing) <= 1, (partition["uuid"], allowing)
    return partitions


@pytest.mark.parametrize("point", LOST_POINTS)
def test_crash_while_a_lost_lease_is_handled(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path], point: str
) -> None:
    agent = lease_agent
    layout_clean(agent, "1g.10gb=2")
    cgroup = any_tenant_cgroup(cgroup_parents, "lost")
    lease = grant(agent, "lost", cgroup, profile="1g.10gb")
    gi = next(
        i["gpu_instance_id"]
        for g in agent.cli_json("status")["gpus"]
        for i in g["instances"]
        if i["uuid"] == lease["partition"]["uuid"]
    )
    agent.stop(signal.SIGTERM)
    agent.start(env={ENVIRONMENT_VARIABLE: point})
    behind_our_back(agent, "destroy", "0", str(gi))
    agent.cli("status")  # the refresh that finds it gone; the agent dies at the point
    assert agent.wait_exit(timeout=60) == -signal.SIGKILL, agent.log()[-2000:]
    agent.start()
    _check_invariants(agent, cgroup_parents)
    assert lease_state(agent, lease["lease"]["id"])["state"] == "lost"
    denied = probe(cgroup, all_gpu_nodes(agent.config.devices.dev_root))
    assert set(denied.values()) == {errno.EPERM}, denied
    # The layout brings an instance back; it can go to another tenant, and only to it.
    layout_clean(agent, "1g.10gb=2")
    other = any_tenant_cgroup(cgroup_parents, "next")
    grant(agent, "next", other, profile="1g.10gb")
    grant(agent, "third", any_tenant_cgroup(cgroup_parents, "third"), profile="1g.10gb")
    _check_invariants_leased(agent, cgroup_parents)


def _check_invariants_leased(agent: RunningAgent, parents: dict[str, Path]) -> None:
    fences, _ = survey_fences(list(parents.values()))
    for partition in agent.cli_json("partition", "list")["partitions"]:
        for major, minor in _own_rdevs(partition):
            allowing = [f.cgroup for f in fences if f.allows("c", major, minor)]
            assert len(allowing) <= 1, (partition["uuid"], allowing)


@pytest.mark.parametrize("point", ORPHAN_POINTS)
def test_crash_while_an_orphan_fence_is_handled(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path], point: str
) -> None:
    agent = lease_agent
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=1")
    [clean] = wait_all_clean(agent)
    stranger = any_tenant_cgroup(cgroup_parents, "stranger")
    rules = []
    for path in clean["device_nodes"]:
        rdev = Path(path).stat().st_rdev
        rules.append(DeviceRule("c", os.major(rdev), os.minor(rdev), frozenset("rw")))
    fence_for(stranger).apply(stranger, rules)
    agent.stop(signal.SIGTERM)
    agent.start(env={ENVIRONMENT_VARIABLE: point}, wait=False)
    assert agent.wait_exit(timeout=60) == -signal.SIGKILL, agent.log()[-2000:]
    agent.start()
    [found] = _check_invariants(agent, cgroup_parents)
    assert found["state"] == "quarantined" and str(stranger) in str(found["reason"])
