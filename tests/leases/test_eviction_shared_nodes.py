"""Eviction never kills the node's own services for holding shared nodes.

nvidia-persistenced, DCGM and dcgm-exporter hold ``/dev/nvidiactl`` and every ``/dev/nvidiaN``
on a GPU node, outside any tenant's cgroup and without a compute context NVML would report. A
release of a MIG lease and of a whole-GPU lease must leave such a process alone, log it, and
still end free and clean.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.leases.helpers import any_tenant_cgroup, hold, holding, reap
from tests.support import RunningAgent, wait_all_clean


def _whole_gpu_one(agent: RunningAgent) -> None:
    """GPU 1 without MIG: the layout asks, the (simulated) reset makes it current."""
    agent.cli_json("layout", "apply", "--gpu", "1", "--mig", "off")
    assert agent.cli("sim", "reset-gpu", "--gpu", "1").returncode == 0
    agent.cli_json("status")


def test_node_services_on_shared_nodes_survive_mig_and_whole_gpu_releases(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    agent = lease_agent
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=1")
    _whole_gpu_one(agent)
    partitions = wait_all_clean(agent)
    assert {p["kind"] for p in partitions} == {"mig", "gpu"}, partitions
    dev = Path(agent.config.devices.dev_root)
    cgroup = any_tenant_cgroup(cgroup_parents, "tenant-pat")
    shared = [dev / "nvidiactl", dev / "nvidia0", dev / "nvidia1"]
    with holding(shared) as service:
        for profile in ("1g.10gb", "gpu"):
            grant = agent.cli_json(
                "lease", "grant", "--tenant", "pat", "--profile", profile, "--cgroup", str(cgroup)
            )
            # A tenant process too, so the eviction has someone to evict.
            tenant = hold(agent, grant["partition"]["uuid"], "--cgroup", str(cgroup))
            released = agent.cli_json("lease", "release", grant["lease"]["id"])
            assert released["state"] == "free" and released["clean"] is True, released
            assert reap(tenant) == -15
            assert service.poll() is None, f"the node service died releasing {profile}"
    events = [json.loads(line) for line in agent.log().splitlines() if line.startswith("{")]
    logged = [e for e in events if e["event"] == "shared_node_holder" and e["pid"] == service.pid]
    assert len(logged) == 2, agent.log()[-4000:]
    assert {str(dev / "nvidiactl"), str(dev / "nvidia0")} <= set(logged[0]["nodes"])
    assert {str(dev / "nvidiactl"), str(dev / "nvidia1")} <= set(logged[1]["nodes"])
    assert not [e for e in events if e["event"] == "evicting_outsider"], agent.log()[-4000:]
