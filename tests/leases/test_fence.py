"""Kernel-enforced isolation end to end: only the tenant's cgroup opens its partition's nodes.

On the simulated node no driver sits behind the NVIDIA majors, so open() returns ENXIO when the
cgroup lets it through and EPERM when the cgroup's device fence denies it.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from agent.isolation.cdi import spec_path
from tests.leases.helpers import tenant_cgroup
from tests.support import RunningAgent, all_gpu_nodes, assert_fenced_to, wait_all_clean


def _layout(agent: RunningAgent) -> None:
    agent.cli_json("layout", "apply", "--gpu", "0", "3g.40gb=1", "1g.10gb=2")
    agent.cli_json("layout", "apply", "--gpu", "1", "7g.80gb=1")
    wait_all_clean(agent)


def _grant(agent: RunningAgent, tenant: str, profile: str, cgroup: Path) -> dict[str, Any]:
    return agent.cli_json(
        "lease", "grant", "--tenant", tenant, "--profile", profile, "--cgroup", str(cgroup)
    )


def test_fence_allows_exactly_the_partition(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path], hierarchy: str
) -> None:
    _layout(lease_agent)
    every = all_gpu_nodes(lease_agent.config.devices.dev_root)
    assert len(every) > 250  # every GPU node and every MIG capability node of the node
    tenant_a = tenant_cgroup(cgroup_parents, hierarchy, "tenant-a")
    tenant_b = tenant_cgroup(cgroup_parents, hierarchy, "tenant-b")
    grant_a = _grant(lease_agent, "alice", "3g.40gb", tenant_a)
    grant_b = _grant(lease_agent, "bob", "1g.10gb", tenant_b)
    nodes_a = grant_a["partition"]["device_nodes"]
    nodes_b = grant_b["partition"]["device_nodes"]
    assert len(nodes_a) == 6 and len(nodes_b) == 6
    assert len(set(nodes_a) & set(nodes_b)) == 4  # ctl, uvm, uvm-tools, nvidia0 are shared

    assert_fenced_to(tenant_a, nodes_a, every)
    assert_fenced_to(tenant_b, nodes_b, every)

    # CDI: a spec for the lease with exactly its nodes.
    spec = json.loads(
        spec_path(lease_agent.config.leases.cdi_dir, grant_a["lease"]["id"]).read_text()
    )
    assert spec["kind"] == "accelguard.io/partition"
    [device] = spec["devices"]
    assert sorted(n["path"] for n in device["containerEdits"]["deviceNodes"]) == sorted(nodes_a)

    # The fence survives the agent: a clean stop, and a SIGKILL.
    for how in (signal.SIGTERM, signal.SIGKILL):
        lease_agent.stop(how)
        assert_fenced_to(tenant_a, nodes_a, every)
        lease_agent.start()
        assert_fenced_to(tenant_a, nodes_a, every)

    released = lease_agent.cli_json("lease", "release", grant_a["lease"]["id"])
    assert released["state"] == "free" and released["clean"] is True
    assert_fenced_to(tenant_a, [], every)
    assert_fenced_to(tenant_b, nodes_b, every)
    assert not spec_path(lease_agent.config.leases.cdi_dir, grant_a["lease"]["id"]).exists()


def test_one_cgroup_two_leases_then_one_released(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path], hierarchy: str
) -> None:
    _layout(lease_agent)
    every = all_gpu_nodes(lease_agent.config.devices.dev_root)
    tenant = tenant_cgroup(cgroup_parents, hierarchy, "tenant-c")
    first = _grant(lease_agent, "carol", "1g.10gb", tenant)
    second = _grant(lease_agent, "carol", "7g.80gb", tenant)
    both = set(first["partition"]["device_nodes"]) | set(second["partition"]["device_nodes"])
    assert_fenced_to(tenant, sorted(both), every)
    lease_agent.cli_json("lease", "release", first["lease"]["id"])
    assert_fenced_to(tenant, second["partition"]["device_nodes"], every)
