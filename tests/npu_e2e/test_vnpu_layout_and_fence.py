"""vNPU layouts and fences on simulated Atlas training (910) and 910B nodes, end to end.

A real agent drives dcmi-sim through the production DCMI backend; tenants are real cgroups (v1
and v2), so the kernel enforces each fence: open() is ENXIO for a node the fence allows (no
driver behind the simulated majors) and EPERM for one it denies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.isolation import fence_for
from agent.isolation.rules import rules_for_nodes
from tests.leases.helpers import tenant_cgroup
from tests.support import (
    RunningAgent,
    assert_fenced_to,
    mutating_calls,
    wait_all_clean,
    wait_until,
)

SHARED = ("davinci_manager", "devmm_svm", "hisi_hdc")


def npu_nodes(agent: RunningAgent) -> list[str]:
    """Every NPU node of the simulated node: physical, vNPU and shared."""
    dev = agent.config.devices.dev_root
    return sorted(str(p) for p in dev.iterdir() if "davinci" in p.name or p.name in SHARED)


def dcmi_calls(agent: RunningAgent) -> int:
    return mutating_calls(Path(agent.config.dcmi.sim_dir))


def vnpus(agent: RunningAgent, npu: int) -> list[dict[str, Any]]:
    return [p for p in agent.partitions() if p["kind"] == "vnpu" and p["gpu_index"] == npu]


def test_910_layout_applied_reapplied_and_refused(npu910_agent: RunningAgent) -> None:
    agent = npu910_agent
    wait_all_clean(agent)
    applied = agent.cli_json("layout", "apply", "--npu", "0", "vir08=2")
    [npu0] = applied["gpus"]
    assert len(npu0["created"]) == 2 and not npu0["noop"]
    assert dcmi_calls(agent) == 2
    names = sorted(p["profile"] for p in vnpus(agent, 0))
    assert names == ["vir08", "vir08"]

    # Already applied: nothing changes, not one DCMI mutating call.
    again = agent.cli_json("layout", "apply", "--npu", "0", "vir08=2")
    assert again["gpus"][0]["noop"] and len(again["gpus"][0]["kept"]) == 2
    assert dcmi_calls(agent) == 2

    # More than the chip holds: refused with one line, nothing changed on any NPU.
    refused = agent.cli("layout", "apply", "--npu", "0", "vir16=1", "vir08=3")
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0
    assert "needs 40 AI Cores, the chip has 32" in refused.stderr
    unknown = agent.cli("layout", "apply", "--npu", "1", "vir10_3c_32g=1")
    assert unknown.returncode == 2 and "unknown vNPU template 'vir10_3c_32g'" in unknown.stderr
    assert dcmi_calls(agent) == 2
    # A split NPU is offered only as its vNPUs; the others stay whole.
    kinds = {(p["kind"], p["gpu_index"]) for p in agent.partitions()}
    assert ("npu", 0) not in kinds and ("npu", 1) in kinds

    # Keep what fits: vir08=1 + vir16=1 keeps one vir08 and creates the vir16 (one destroy).
    changed = agent.cli_json("layout", "apply", "--npu", "0", "vir08=1", "vir16=1")
    [result] = changed["gpus"]
    assert (len(result["kept"]), len(result["destroyed"]), len(result["created"])) == (1, 1, 1)
    assert dcmi_calls(agent) == 4
    # --clear gives the NPU back whole.
    agent.cli_json("layout", "apply", "--npu", "0", "--clear")
    wait_all_clean(agent)
    assert not vnpus(agent, 0)
    assert ("npu", 0) in {(p["kind"], p["gpu_index"]) for p in agent.partitions()}


def test_910b_templates(npu910b_agent: RunningAgent) -> None:
    agent = npu910b_agent
    wait_all_clean(agent)
    agent.cli_json("layout", "apply", "--npu", "3", "vir10_3c_32g=1", "vir05_1c_16g=2")
    assert sorted(p["profile"] for p in vnpus(agent, 3)) == [
        "vir05_1c_16g", "vir05_1c_16g", "vir10_3c_32g",
    ]  # fmt: skip
    refused = agent.cli("layout", "plan", "--npu", "3", "vir10_3c_32g=3")
    assert refused.returncode == 2 and "needs 30 AI Cores, the chip has 20" in refused.stderr
    # A 910 template is not a 910B's.
    wrong = agent.cli("layout", "plan", "--npu", "3", "vir08=1")
    assert wrong.returncode == 2 and "unknown vNPU template 'vir08'" in wrong.stderr


def test_vnpu_fence_allows_exactly_its_nodes(
    npu910_agent: RunningAgent, cgroup_parents: dict[str, Path], hierarchy: str
) -> None:
    agent = npu910_agent
    agent.cli_json("layout", "apply", "--npu", "0", "vir08=2")
    agent.cli_json("layout", "apply", "--npu", "2", "vir16=2")
    wait_all_clean(agent)
    every = npu_nodes(agent)
    assert len(every) == 3 + 8 + 8 * 16
    dev = agent.config.devices.dev_root
    [first, second] = sorted(vnpus(agent, 0), key=lambda p: p["uuid"])
    alice = tenant_cgroup(cgroup_parents, hierarchy, "alice")
    bob = tenant_cgroup(cgroup_parents, hierarchy, "bob")
    carol = tenant_cgroup(cgroup_parents, hierarchy, "carol")
    lease_a = agent.cli_json(
        "lease", "grant", "--tenant", "alice", "--partition", first["uuid"], "--cgroup", str(alice)
    )
    lease_b = agent.cli_json(
        "lease", "grant", "--tenant", "bob", "--partition", second["uuid"], "--cgroup", str(bob)
    )
    # A whole NPU: its physical node and the shared ones.
    whole = next(p for p in agent.partitions() if p["kind"] == "npu" and p["gpu_index"] == 5)
    lease_c = agent.cli_json(
        "lease", "grant", "--tenant", "carol", "--partition", whole["uuid"], "--cgroup", str(carol)
    )
    shared = [str(dev / name) for name in SHARED]
    nodes_a = lease_a["partition"]["device_nodes"]
    nodes_b = lease_b["partition"]["device_nodes"]
    nodes_c = lease_c["partition"]["device_nodes"]
    # vNPU k of the chip with physical id p is vdev 100 + 16p + k; DCMI hands out 100 and 101.
    assert sorted(nodes_a) == sorted([*shared, str(dev / "vdavinci100")])
    assert sorted(nodes_b) == sorted([*shared, str(dev / "vdavinci101")])
    assert sorted(nodes_c) == sorted([*shared, str(dev / "davinci5")])
    assert_fenced_to(alice, nodes_a, every)
    assert_fenced_to(bob, nodes_b, every)
    assert_fenced_to(carol, nodes_c, every)

    # A whole NPU that is leased cannot be split under its tenant.
    refused = agent.cli("layout", "apply", "--npu", "5", "vir08=1")
    assert refused.returncode == 2 and "as a whole NPU" in refused.stderr
    # A leased vNPU is never destroyed by a relayout.
    refused = agent.cli("layout", "apply", "--npu", "0", "vir16=2")
    assert refused.returncode == 2 and f"held by lease {lease_a['lease']['id']}" in refused.stderr

    released = agent.cli_json("lease", "release", lease_a["lease"]["id"])
    assert released["state"] == "free" and released["clean"] is True
    assert_fenced_to(alice, [], every)
    assert_fenced_to(bob, nodes_b, every)


def test_910b_vnpu_fence(
    npu910b_agent: RunningAgent, cgroup_parents: dict[str, Path], hierarchy: str
) -> None:
    agent = npu910b_agent
    agent.cli_json("layout", "apply", "--npu", "7", "vir05_1c_16g=4")
    wait_all_clean(agent)
    tenant = tenant_cgroup(cgroup_parents, hierarchy, "b-tenant")
    lease = agent.cli_json(
        "lease", "grant", "--tenant", "b", "--profile", "vir05_1c_16g", "--cgroup", str(tenant)
    )
    dev = agent.config.devices.dev_root
    # The first vNPU of the chip with physical id 7: vdev 100 + 16 * 7.
    assert str(dev / "vdavinci212") in lease["partition"]["device_nodes"]
    assert_fenced_to(tenant, lease["partition"]["device_nodes"], npu_nodes(agent))


def test_a_fence_left_on_the_whole_chip_blocks_its_vnpus(
    npu910_agent: RunningAgent, cgroup_parents: dict[str, Path], hierarchy: str
) -> None:
    """A fence that still opens /dev/davinci0 (a whole-NPU tenant the journal lost) reaches the
    whole chip: the agent's fence survey quarantines the chip's vNPUs, and none is granted."""
    agent = npu910_agent
    agent.cli_json("layout", "apply", "--npu", "0", "vir08=2")
    agent.cli_json("layout", "apply", "--npu", "1", "vir08=1")
    wait_all_clean(agent)
    dev = agent.config.devices.dev_root
    leftover = tenant_cgroup(cgroup_parents, hierarchy, "leftover")
    fence_for(leftover).apply(leftover, rules_for_nodes([dev / "davinci0"]))
    agent.stop()
    agent.start()  # the start-up survey reads every fence back from the kernel
    # The admin socket answers before the start-up survey ends: wait for its verdict.
    wait_until(
        lambda: all(p["state"] == "quarantined" for p in vnpus(agent, 0)), "the survey's verdict"
    )
    states = {p["uuid"]: p for p in vnpus(agent, 0)}
    assert all(p["state"] == "quarantined" for p in states.values()), states
    assert all(str(leftover) in p["reason"] for p in states.values()), states
    # Cleared (scrubbed) by the operator, still not granted while that fence opens the chip.
    tenant = tenant_cgroup(cgroup_parents, hierarchy, "tenant")
    for uuid in states:
        cleared = agent.cli_json("partition", "clear", uuid, "--reason", "checked")
        assert cleared["state"] == "free" and cleared["clean"] is True
        refused = agent.cli(
            "lease", "grant", "--tenant", "t", "--partition", uuid, "--cgroup", str(tenant)
        )
        assert refused.returncode != 0
        assert f"allows {dev / 'davinci0'}, the whole NPU the vNPU is part of" in refused.stderr
    # The other chip's vNPU is not affected.
    [other] = vnpus(agent, 1)
    assert other["state"] == "free" and other["clean"]
    granted = agent.cli_json(
        "lease", "grant", "--tenant", "t", "--partition", other["uuid"], "--cgroup", str(tenant)
    )
    assert granted["lease"]["state"] == "active"


def test_splitting_a_dirty_npu_scrubs_it_first(npu910_agent: RunningAgent) -> None:
    """Right after start every NPU is dirty or being scrubbed: a split waits for (or runs) the
    whole NPU's scrub instead of refusing or taking its memory from under the scrub."""
    agent = npu910_agent
    whole = next(p for p in agent.partitions() if p["kind"] == "npu" and p["gpu_index"] == 3)
    applied = agent.cli("layout", "apply", "--npu", "3", "vir16=2", "--json")
    assert applied.returncode == 0, applied.stderr
    certificates = agent.cli_json("scrub", "certs", "--partition", whole["uuid"])["certificates"]
    assert certificates and certificates[0]["payload"]["verified"] is True
    assert len(vnpus(agent, 3)) == 2
