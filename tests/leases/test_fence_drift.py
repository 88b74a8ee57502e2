"""A fence changed behind the agent's back while its lease is live (another device manager, an
operator's `echo a > devices.allow`, a program attached over ours) is found by the periodic
fence survey and re-applied; the kernel is the judge (ENXIO = allowed, EPERM = denied)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import config_as_dict, load_config, parse_config, to_toml
from agent.isolation import fence_for
from agent.isolation.rules import DeviceRule
from agent.sim.node import init_sim_node
from tests.leases.helpers import grant, layout_clean, tenant_cgroup
from tests.link.support import wait_for
from tests.support import RunningAgent, probe, running_agent


@pytest.fixture
def agent(tmp_path: Path, cgroup_parents: dict[str, Path]) -> Iterator[RunningAgent]:
    node = init_sim_node(
        tmp_path / "node", "h100x2", cgroup_parents=list(cgroup_parents.values()),
        slice_bytes=1 << 20,
    )  # fmt: skip
    document = config_as_dict(load_config(node.config_path))
    # The survey runs every refresh interval: short here so the test does not wait 30 s.
    document["inventory"]["refresh_interval_s"] = 1.0
    node.config_path.write_text(to_toml(parse_config(document)))
    with running_agent(node) as running:
        yield running


def _rules(paths: list[str]) -> list[DeviceRule]:
    rules = []
    for path in paths:
        rdev = Path(path).stat().st_rdev
        rules.append(DeviceRule("c", os.major(rdev), os.minor(rdev), frozenset("rw")))
    return rules


def test_a_widened_fence_is_narrowed_back(
    agent: RunningAgent, cgroup_parents: dict[str, Path], hierarchy: str
) -> None:
    first, second = layout_clean(agent, "3g.40gb=2", gpu=0)[:2]
    cgroup = tenant_cgroup(cgroup_parents, hierarchy, "alice")
    lease = grant(agent, "alice", cgroup, partition=first["uuid"])
    own = lease["partition"]["device_nodes"]
    other = [path for path in second["device_nodes"] if path not in own]
    assert other, "the second instance has nodes of its own"
    assert set(probe(cgroup, other).values()) == {errno.EPERM}
    # Behind the agent's back: the tenant's fence now also allows the other instance.
    fence_for(cgroup).apply(cgroup, _rules(own) + _rules(other))
    # The kernel took the widening, unless the survey (every second here) narrowed it back before
    # this probe's process started, as it did on a loaded machine.
    widened = set(probe(cgroup, other).values())
    assert widened == {errno.ENXIO} or "fence_drift_corrected" in agent.log(), widened

    wait_for(lambda: "fence_drift_corrected" in agent.log(), "the drift to be found", timeout=30)
    wait_for(lambda: set(probe(cgroup, other).values()) == {errno.EPERM}, "the fence re-applied")
    assert set(probe(cgroup, own).values()) == {errno.ENXIO}, "the tenant lost its own nodes"
    leases = agent.cli_json("lease", "list")["leases"]
    assert [(x["id"], x["state"]) for x in leases] == [(lease["lease"]["id"], "active")]


def test_a_removed_fence_is_put_back(agent: RunningAgent, cgroup_parents: dict[str, Path]) -> None:
    """Our device program detached from a live lease's cgroup (bpftool, another manager): the
    survey finds no fence there at all, and the agent fences it again."""
    if "v2" not in cgroup_parents:
        pytest.skip("no cgroup v2 hierarchy: a v1 fence cannot be removed, only widened")
    first, second = layout_clean(agent, "3g.40gb=2", gpu=0)[:2]
    cgroup = tenant_cgroup(cgroup_parents, "v2", "bob")
    lease = grant(agent, "bob", cgroup, partition=first["uuid"])
    other = [
        path for path in second["device_nodes"] if path not in lease["partition"]["device_nodes"]
    ]
    assert set(probe(cgroup, other).values()) == {errno.EPERM}
    fence_for(cgroup).remove(cgroup)
    assert fence_for(cgroup).current(cgroup) is None
    wait_for(lambda: "fence_missing_restored" in agent.log(), "the missing fence found", timeout=30)
    wait_for(lambda: set(probe(cgroup, other).values()) == {errno.EPERM}, "the fence re-applied")
    assert fence_for(cgroup).current(cgroup) is not None
    leases = agent.cli_json("lease", "list")["leases"]
    assert [(x["id"], x["state"]) for x in leases] == [(lease["lease"]["id"], "active")]
