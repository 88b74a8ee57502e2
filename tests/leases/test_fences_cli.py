"""``accelguard fences list|clear``: what uninstalling leaves in the kernel, and removing it.

A real agent fences real v1 and v2 tenant cgroups; it is stopped (its fences stay: a stopped agent
opens nothing); `fences clear` removes exactly ours, refuses while an agent runs, leaves a v1
device list no lease explains (a container runtime's) alone, refuses a cgroup whose lease is live
unless forced, and records each removal. An agent started after a forced removal puts the fence of
its live lease back.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

from agent.isolation import fence_for
from agent.isolation.cgroup_v1 import CgroupV1Fence
from agent.isolation.rules import DeviceRule
from tests.leases.helpers import layout_clean, tenant_cgroup
from tests.link.support import wait_for
from tests.support import RunningAgent, probe, run_cli


def _grant(agent: RunningAgent, cgroup: Path, tenant: str) -> dict[str, Any]:
    return dict(
        agent.cli_json(
            "lease", "grant", "--tenant", tenant, "--profile", "1g.10gb", "--cgroup", str(cgroup)
        )
    )


def _fences(agent: RunningAgent) -> dict[str, dict[str, Any]]:
    return {f["cgroup"]: f for f in agent.cli_json("fences", "list")["fences"]}


def test_list_then_clear_after_the_agent_stops(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    agent = lease_agent
    layout_clean(agent, "1g.10gb=2")
    cgroups = {h: tenant_cgroup(cgroup_parents, h, f"uninstall-{h}") for h in cgroup_parents}
    grants = {h: _grant(agent, path, f"t-{h}") for h, path in cgroups.items()}
    stranger = None
    if "v1" in cgroup_parents:
        # A restricted v1 cgroup no lease explains: what a container runtime leaves.
        stranger = tenant_cgroup(cgroup_parents, "v1", "runtime")
        CgroupV1Fence().apply(stranger, [DeviceRule("c", 195, 255, frozenset("rw"))])

    listed = _fences(agent)
    for hierarchy, path in cgroups.items():
        fence = listed[str(path)]
        assert fence["ours"] is True
        assert fence["live_leases"] == [grants[hierarchy]["lease"]["id"]]
        assert fence["allowed"], fence  # the partition's nodes, beyond the baseline
    if stranger is not None:
        assert listed[str(stranger)]["ours"] is False

    # While the agent runs, clear is refused and changes nothing.
    refused = agent.cli("fences", "clear", "--all")
    assert refused.returncode != 0
    assert "stop that agent first" in refused.stderr
    assert all(fence_for(p).current(p) is not None for p in cgroups.values())

    assert agent.stop() == 0
    # The agent stopped; its fences did not.
    assert all(fence_for(p).current(p) is not None for p in cgroups.values())

    # Live leases: refused (release them first: that scrubs), nothing removed.
    live = run_cli("fences", "clear", "--all", config=agent.config_path)
    assert live.returncode == 2
    assert "release them first" in live.stderr and "nothing was removed" in live.stderr
    assert all(fence_for(p).current(p) is not None for p in cgroups.values())

    cleared = run_cli("fences", "clear", "--all", "--force", "--json", config=agent.config_path)
    assert cleared.returncode == 0, cleared.stderr
    result = json.loads(cleared.stdout)
    assert sorted(r["cgroup"] for r in result["removed"]) == sorted(map(str, cgroups.values()))
    assert result["failed"] == []
    assert result["left_alone"] == ([str(stranger)] if stranger is not None else [])
    for path in cgroups.values():
        assert fence_for(path).current(path) is None, path  # a fresh child's access again
    if stranger is not None:
        assert fence_for(stranger).current(stranger) is not None
    # Every removal is the operator's, in the audit log.
    records = run_cli("audit", "show", "--json", config=agent.config_path)
    removed = [r for r in json.loads(records.stdout)["records"] if r["action"] == "fence.removed"]
    assert sorted(r["detail"]["cgroup"] for r in removed) == sorted(map(str, cgroups.values()))
    assert {r["actor"]["kind"] for r in removed} == {"operator"}

    # The next agent finds its live leases unfenced and fences them again.
    agent.start()

    def fenced_again() -> bool:
        return all(fence_for(p).current(p) is not None for p in cgroups.values())

    wait_for(fenced_again, "the live leases' fences re-applied")
    listed = _fences(agent)
    for hierarchy, path in cgroups.items():
        assert listed[str(path)]["live_leases"] == [grants[hierarchy]["lease"]["id"]]
        assert listed[str(path)]["allowed"]


def test_uninstall_after_releasing_leaves_no_fence(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    """The documented uninstall: release every lease (scrubbed), stop the agent, clear."""
    agent = lease_agent
    layout_clean(agent, "1g.10gb=1")
    path = tenant_cgroup(cgroup_parents, "v2" if "v2" in cgroup_parents else "v1", "done")
    lease = _grant(agent, path, "leaving")["lease"]
    assert agent.cli("lease", "release", lease["id"]).returncode == 0
    # Revoked to the baseline, not removed: the cgroup still cannot open a GPU.
    assert _fences(agent)[str(path)]["allowed"] == []
    assert agent.stop() == 0
    cleared = run_cli("fences", "clear", "--all", config=agent.config_path)
    assert cleared.returncode == 0, cleared.stderr
    assert f"fence on {path}" in cleared.stdout
    assert fence_for(path).current(path) is None
    again = run_cli("fences", "clear", "--all", config=agent.config_path)
    assert again.returncode == 0
    assert "no fences to remove" in again.stderr


def test_clear_named_cgroups_refuses_what_is_not_ours(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    agent = lease_agent
    assert agent.stop() == 0
    unknown = run_cli("fences", "clear", "/sys/fs/cgroup/nowhere", config=agent.config_path)
    assert unknown.returncode == 2
    assert "no fence there" in unknown.stderr and "nothing was removed" in unknown.stderr
    if "v1" not in cgroup_parents:
        pytest.skip("no cgroup v1 devices hierarchy: no v1 device list to leave alone")
    stranger = tenant_cgroup(cgroup_parents, "v1", "runtime")
    CgroupV1Fence().apply(stranger, [DeviceRule("c", 195, 255, frozenset("rw"))])
    refused = run_cli("fences", "clear", str(stranger), config=agent.config_path)
    assert refused.returncode == 2
    assert "left alone" in refused.stderr
    assert fence_for(stranger).current(stranger) is not None


def test_a_fenced_tenant_stays_fenced_until_cleared(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path], hierarchy: str
) -> None:
    """From inside the tenant's cgroup: another GPU's node is refused while the stopped agent's
    fence stands, and opens once the fence is cleared."""
    agent = lease_agent
    layout_clean(agent, "1g.10gb=1")
    cgroup = tenant_cgroup(cgroup_parents, hierarchy, "probe")
    _grant(agent, cgroup, "prober")
    other_gpu = str(agent.node.root / "dev" / "nvidia1")
    assert agent.stop() == 0
    # The simulated nodes have no driver: an open the fence allows fails with ENXIO.
    before = probe(cgroup, [other_gpu])
    assert before[other_gpu] == errno.EPERM, before
    cleared = run_cli("fences", "clear", str(cgroup), "--force", config=agent.config_path)
    assert cleared.returncode == 0, cleared.stderr
    assert f"removed the cgroup-{'v2-bpf' if hierarchy == 'v2' else 'v1-devices'} fence" in (
        cleared.stdout
    )
    after = probe(cgroup, [other_gpu])
    assert after[other_gpu] == errno.ENXIO, after
