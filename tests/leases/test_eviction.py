"""Release evicts every holder (SIGTERM, grace, kill) before the scrub; outsiders too."""

from __future__ import annotations

import json
from pathlib import Path

from tests.leases.helpers import any_tenant_cgroup, hold, holding, reap, tenant_cgroup
from tests.support import RunningAgent, wait_all_clean


def test_release_evicts_holders_then_scrubs(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path], hierarchy: str
) -> None:
    agent = lease_agent
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=2")
    wait_all_clean(agent)
    cgroup = tenant_cgroup(cgroup_parents, hierarchy, "tenant-e")
    grant = agent.cli_json(
        "lease", "grant", "--tenant", "erin", "--profile", "1g.10gb", "--cgroup", str(cgroup)
    )
    partition = grant["partition"]["uuid"]
    polite = hold(agent, partition, "--cgroup", str(cgroup))
    stubborn = hold(agent, partition, "--cgroup", str(cgroup), "--ignore-sigterm")
    # A process outside the tenant's cgroup that NVML reports on the instance.
    outsider = hold(agent, partition)
    members = (cgroup / "cgroup.procs").read_text().split()
    assert str(polite.pid) in members and str(stubborn.pid) in members
    assert str(outsider.pid) not in members

    released = agent.cli_json("lease", "release", grant["lease"]["id"])
    assert released["state"] == "free" and released["clean"] is True, released
    assert reap(polite) == -15
    assert reap(stubborn) == -9
    assert reap(outsider) in (-15, -9)
    events = [json.loads(line) for line in agent.log().splitlines() if line.startswith("{")]
    outsiders = [e for e in events if e["event"] == "evicting_outsider"]
    assert [e["pid"] for e in outsiders] == [outsider.pid], agent.log()[-4000:]
    evicted = next(i for i, e in enumerate(events) if e["event"] == "lease_evicted")
    assert stubborn.pid in events[evicted]["killed"]
    # The scrub that made it clean started after the last holder was gone (invariant 2).
    scrub_start = max(
        i for i, e in enumerate(events)
        if e["event"] == "scrub_started" and e["partition"] == partition
    )  # fmt: skip
    assert scrub_start > evicted
    scrubbed = next(
        e for e in events
        if e["event"] == "partition_scrubbed" and e["lease"] == grant["lease"]["id"]
    )  # fmt: skip
    assert scrubbed["coverage"] == 1.0


def test_release_spares_the_processes_of_the_cgroups_other_lease(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    agent = lease_agent
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=2")
    wait_all_clean(agent)
    cgroup = any_tenant_cgroup(cgroup_parents, "tenant-two")
    first, second = (
        agent.cli_json(
            "lease", "grant", "--tenant", "tess", "--profile", "1g.10gb", "--cgroup", str(cgroup)
        )
        for _ in range(2)
    )
    on_first = hold(agent, first["partition"]["uuid"], "--cgroup", str(cgroup))
    on_second = hold(agent, second["partition"]["uuid"], "--cgroup", str(cgroup))
    dev = Path(agent.config.devices.dev_root)
    # A process of the job on the second lease that, like every CUDA process, holds the nodes
    # both leases share: releasing the first lease is no reason to kill it.
    with holding([dev / "nvidiactl", dev / "nvidia-uvm", dev / "nvidia0"], cgroup) as sharer:
        released = agent.cli_json("lease", "release", first["lease"]["id"])
        assert released["state"] == "free" and released["clean"] is True, released
        assert reap(on_first) == -15
        assert on_second.poll() is None and sharer.poll() is None
        # The cgroup's last lease: now every process of it holding any NVIDIA node goes.
        released = agent.cli_json("lease", "release", second["lease"]["id"])
        assert released["state"] == "free" and released["clean"] is True, released
        assert reap(on_second) == -15
        assert sharer.wait(timeout=30) == -15
