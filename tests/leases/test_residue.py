"""No residue between tenants: what tenant A wrote is gone before tenant B can read anything."""

from __future__ import annotations

from pathlib import Path

from agent.config import load_config
from agent.hw.mig.geometry import Placement
from agent.hw.nvml import NvmlBackend
from agent.sim import workload
from agent.sim.node import init_sim_node
from tests.leases.helpers import any_tenant_cgroup
from tests.support import RunningAgent, wait_all_clean

SECRET = "tenant-a-model-weights-0xC0FFEE"


def test_secret_in_3g_never_reaches_1g_tenants(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    agent = lease_agent
    agent.cli_json("layout", "apply", "--gpu", "0", "3g.40gb=2")
    wait_all_clean(agent)
    tenant_a = any_tenant_cgroup(cgroup_parents, "a")
    instances = agent.cli_json("status")["gpus"][0]["instances"]
    first = next(i for i in instances if i["placement_start"] == 0)
    lease = agent.cli_json(
        "lease",
        "grant",
        "--tenant",
        "alice",
        "--partition",
        first["uuid"],
        "--cgroup",
        str(tenant_a),
    )["lease"]
    assert (
        agent.cli("sim", "write", "--partition", first["uuid"], "--pattern", SECRET).returncode == 0
    )
    found = agent.cli_json("sim", "read", "--partition", first["uuid"], "--find", SECRET)
    assert found["count"] > 1000  # the whole 3g range holds the secret

    agent.cli_json("lease", "release", lease["id"])
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=7")
    wait_all_clean(agent)
    ones = agent.cli_json("status")["gpus"][0]["instances"]
    assert sorted(i["placement_start"] for i in ones) == list(range(7))
    reached = 0
    for instance in ones:
        read = agent.cli_json("sim", "read", "--partition", instance["uuid"], "--find", SECRET)
        assert read["count"] == 0, instance
        reached += read["bytes_read"]
    assert reached == 7 * agent.config.sim.slice_bytes


def test_without_a_scrub_the_secret_would_leak(tmp_path: Path) -> None:
    """The control: the simulated memory keeps residue exactly as hardware does."""
    node = init_sim_node(tmp_path / "node", "h100x1", slice_bytes=1 << 20)
    config = load_config(node.config_path)
    with NvmlBackend(config.nvml.library, config.nvml.sim_dir) as backend:
        big = backend.create_instance(0, Placement(profile_id=9, start=0, size=4))
        workload.write_pattern(config, big.uuid, SECRET)
        backend.destroy_instance(0, big.gpu_instance_id)  # no scrub: what the driver promises
        small = backend.create_instance(0, Placement(profile_id=19, start=2, size=1))
    _, count = workload.find_pattern(config, small.uuid, SECRET)
    assert count > 1000


def test_layout_never_destroys_a_leased_instance(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    agent = lease_agent
    agent.cli_json("layout", "apply", "--gpu", "0", "3g.40gb=2")
    wait_all_clean(agent)
    cgroup = any_tenant_cgroup(cgroup_parents, "busy")
    grant = agent.cli_json(
        "lease", "grant", "--tenant", "t", "--profile", "3g.40gb", "--cgroup", str(cgroup)
    )
    before = agent.cli_json("status")["gpus"]
    refused = agent.cli("layout", "apply", "--gpu", "0", "1g.10gb=7")
    assert refused.returncode != 0
    assert "pinned" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert agent.cli_json("status")["gpus"] == before
    # A layout that keeps the leased instance is fine; the free one is scrubbed and replaced.
    kept = agent.cli_json("layout", "apply", "--gpu", "0", "3g.40gb=1", "1g.10gb=3")["gpus"][0]
    assert [i["uuid"] for i in kept["kept"]] == [grant["partition"]["uuid"]]
    [lease] = agent.cli_json("lease", "list")["leases"]
    assert lease["state"] == "active"
