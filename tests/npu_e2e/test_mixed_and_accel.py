"""A mixed node (an H100 and two 910B NPUs) and /dev/accel devices, end to end."""

from __future__ import annotations

import errno
import json
from pathlib import Path

from agent.sim.accel import reset_count
from agent.sim.node import init_sim_node
from tests.leases.helpers import tenant_cgroup
from tests.npu_e2e.test_vnpu_layout_and_fence import npu_nodes, vnpus
from tests.support import (
    RunningAgent,
    all_gpu_nodes,
    assert_fenced_to,
    probe,
    running_agent,
    wait_all_clean,
    wait_settled,
)


def test_mixed_node_leases_are_fenced_independently(
    mixed_agent: RunningAgent, cgroup_parents: dict[str, Path], hierarchy: str
) -> None:
    agent = mixed_agent
    agent.cli_json("layout", "apply", "--gpu", "0", "3g.40gb=2")
    agent.cli_json("layout", "apply", "--npu", "1", "vir10_3c_32g=2")
    # GPU and NPU layouts are separate applies (their indices overlap).
    mixed = agent.cli("layout", "apply", "--gpu", "0", "3g.40gb=2", "--npu", "0", "vir05_1c_16g=1")
    assert mixed.returncode == 2
    wait_all_clean(agent)
    gpu_tenant = tenant_cgroup(cgroup_parents, hierarchy, "gpu-tenant")
    npu_tenant = tenant_cgroup(cgroup_parents, hierarchy, "npu-tenant")
    gpu_lease = agent.cli_json(
        "lease", "grant", "--tenant", "g", "--profile", "3g.40gb", "--cgroup", str(gpu_tenant)
    )
    npu_lease = agent.cli_json(
        "lease", "grant", "--tenant", "n", "--profile", "vir10_3c_32g", "--cgroup", str(npu_tenant)
    )
    assert npu_lease["partition"]["kind"] == "vnpu"
    every = all_gpu_nodes(agent.config.devices.dev_root) + npu_nodes(agent)
    assert_fenced_to(gpu_tenant, gpu_lease["partition"]["device_nodes"], every)
    assert_fenced_to(npu_tenant, npu_lease["partition"]["device_nodes"], every)

    status = agent.cli_json("status")
    devices = {(d["vendor"], d["index"]) for d in status["gpus"]}
    assert devices == {("nvidia", 0), ("huawei", 0), ("huawei", 1)}
    kinds = {p["kind"] for p in status["partitions"]}
    assert kinds == {"mig", "npu", "vnpu"}
    text = agent.cli("status").stdout
    assert "GPU 0  " in text and "NPU 1  " in text and "2 vNPUs" in text
    assert "vNPU 116" in text and "vNPU 117" in text  # NPU 1's vdev ids: 100 + 16 * 1 + k

    agent.cli_json("lease", "release", gpu_lease["lease"]["id"])
    assert_fenced_to(gpu_tenant, [], every)
    assert_fenced_to(npu_tenant, npu_lease["partition"]["device_nodes"], every)


def _accel(agent: RunningAgent) -> tuple[Path, list[dict[str, object]]]:
    sys_root = agent.config.accel.sys_root
    devices = [d for d in agent.cli_json("status")["gpus"] if d["vendor"] == "accel"]
    assert [d["index"] for d in devices] == [0, 1]
    return sys_root, devices


def test_accel_whole_device_lease_and_reset_policy(
    accel_agent: RunningAgent, cgroup_parents: dict[str, Path], hierarchy: str
) -> None:
    agent = accel_agent
    accept = agent.config.scrub.accept_unverified
    sys_root, devices = _accel(agent)
    bdfs = [str(d["pci_bus_id"]) for d in devices]
    settled = wait_settled(agent)
    # New devices are reset once at start (nobody can vouch for their memory).
    assert [reset_count(sys_root, bdf) for bdf in bdfs] == [1, 1]
    if not accept:
        # Unverifiable: quarantined until an operator clears it, which accepts the reset.
        assert {p["state"] for p in settled} == {"quarantined"}
        assert all("unverifiable scrub" in str(p["reason"]) for p in settled)
        for partition in settled:
            cleared = agent.cli_json(
                "partition", "clear", str(partition["uuid"]), "--reason", "accepted by ops"
            )
            assert cleared["state"] == "free" and cleared["clean"] is True
        assert [reset_count(sys_root, bdf) for bdf in bdfs] == [2, 2]
    first = next(p for p in agent.partitions() if p["gpu_index"] == 0)
    assert first["kind"] == "accel" and first["state"] == "free"
    before = reset_count(sys_root, bdfs[0])

    tenant = tenant_cgroup(cgroup_parents, hierarchy, "accel-tenant")
    lease = agent.cli_json(
        "lease", "grant", "--tenant", "t", "--partition", str(first["uuid"]),
        "--cgroup", str(tenant),
    )  # fmt: skip
    dev = agent.config.devices.dev_root
    nodes = [str(dev / "accel" / "accel0"), str(dev / "accel" / "accel1")]
    assert lease["partition"]["device_nodes"] == nodes[:1]
    result = probe(tenant, nodes)
    assert result == {nodes[0]: errno.ENXIO, nodes[1]: errno.EPERM}

    released = agent.cli("lease", "release", "--json", lease["lease"]["id"])
    assert reset_count(sys_root, bdfs[0]) == before + 1  # the release reset the device
    record = json.loads(released.stdout)
    if accept:
        assert released.returncode == 0 and record["state"] == "free"
    else:
        assert released.returncode == 3 and record["state"] == "quarantined"
        assert "unverifiable scrub" in record["reason"]
    assert set(probe(tenant, nodes).values()) == {errno.EPERM}
    # The certificate is honest either way: a reset, nothing verified.
    certificates = agent.cli_json("scrub", "certs", "--partition", str(first["uuid"]))
    latest = certificates["certificates"][-1]["payload"]
    assert latest["policy"] == "reset" and latest["verified"] is False
    assert latest["partition_kind"] == "accel" and latest["previous_lease_id"]


def test_vnpus_listed_by_template(npu910_agent: RunningAgent) -> None:
    agent = npu910_agent
    agent.cli_json("layout", "apply", "--npu", "2", "vir04=1", "vir02=2")
    wait_all_clean(agent)
    assert sorted(p["profile"] for p in vnpus(agent, 2)) == ["vir02", "vir02", "vir04"]


def test_gpu_and_accel_indices_never_mix(
    tmp_path: Path, cgroup_parents: dict[str, Path], hierarchy: str
) -> None:
    """GPU 0 and accel 0 on one node: turning MIG on under a GPU leased whole is still refused
    (the layout's index map once took accel 0 for GPU 0, which has no MIG, and let it pass)."""
    node = init_sim_node(
        tmp_path / "node", "h100x1,accel1", cgroup_parents=list(cgroup_parents.values()),
        mig_enabled=False, slice_bytes=1 << 18,
    )  # fmt: skip
    with running_agent(node) as agent:
        whole = next(p for p in wait_settled(agent) if p["kind"] == "gpu")
        tenant = tenant_cgroup(cgroup_parents, hierarchy, "whole-gpu")
        agent.cli_json(
            "lease", "grant", "--tenant", "t", "--partition", whole["uuid"], "--cgroup", str(tenant)
        )
        refused = agent.cli("layout", "apply", "--gpu", "0", "--clear")
        assert refused.returncode == 2 and "as a whole GPU" in refused.stderr, refused.stderr
