"""Leases granted before their cgroup exists (``lease grant --bind-later``, a Slurm Prolog's)
and fenced when ``lease bind`` names it."""

from __future__ import annotations

import errno
from pathlib import Path

from tests.leases.helpers import tenant_cgroup
from tests.support import RunningAgent, all_gpu_nodes, probe, wait_all_clean


def test_a_lease_bound_later_is_fenced_when_bound(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path], hierarchy: str
) -> None:
    agent = lease_agent
    agent.cli_json("layout", "apply", "--gpu", "0", "3g.40gb=2")
    wait_all_clean(agent)
    granted = agent.cli_json(
        "lease", "grant", "--tenant", "job:7", "--profile", "3g.40gb", "--bind-later"
    )
    lease = granted["lease"]
    assert lease["state"] == "active" and lease["cgroup"] == ""
    # The partition is taken: nobody else gets it while the lease waits for its cgroup.
    [partition] = [p for p in agent.partitions() if p["uuid"] == lease["partition_uuid"]]
    assert partition["state"] == "leased" and partition["holder"] == lease["id"]

    job = tenant_cgroup(cgroup_parents, hierarchy, "job_7")
    every = all_gpu_nodes(agent.config.devices.dev_root)
    assert set(probe(job, every).values()) == {errno.ENXIO}  # nothing fences it yet
    bound = agent.cli_json("lease", "bind", lease["id"], "--cgroup", str(job))
    assert bound["cgroup"] == str(job)
    nodes = granted["partition"]["device_nodes"]
    opened = probe(job, every)
    assert sorted(p for p, code in opened.items() if code == errno.ENXIO) == sorted(nodes)
    assert {code for p, code in opened.items() if p not in nodes} == {errno.EPERM}

    # Binding again to the same cgroup changes nothing; to another is refused.
    assert agent.cli_json("lease", "bind", lease["id"], "--cgroup", str(job))["cgroup"] == str(job)
    other = tenant_cgroup(cgroup_parents, hierarchy, "job_8")
    refused = agent.cli("lease", "bind", lease["id"], "--cgroup", str(other))
    assert refused.returncode == 2 and "bound to" in refused.stderr

    released = agent.cli_json("lease", "release", lease["id"])
    assert released["state"] == "free" and released["clean"] is True
    assert set(probe(job, every).values()) == {errno.EPERM}
    refused = agent.cli("lease", "bind", lease["id"], "--cgroup", str(job))
    assert refused.returncode == 2 and "only an active lease is bound" in refused.stderr


def test_an_unbound_lease_is_released_and_refuses_bad_binds(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path], hierarchy: str
) -> None:
    agent = lease_agent
    agent.cli_json("layout", "apply", "--gpu", "0", "3g.40gb=2")
    wait_all_clean(agent)
    both = agent.cli("lease", "grant", "--tenant", "t", "--profile", "3g.40gb", "--bind-later",
                     "--cgroup", "/sys/fs/cgroup")  # fmt: skip
    assert both.returncode == 2  # one or the other
    first = agent.cli_json("lease", "grant", "--tenant", "a", "--profile", "3g.40gb",
                           "--bind-later")["lease"]  # fmt: skip
    second = agent.cli_json("lease", "grant", "--tenant", "b", "--profile", "3g.40gb",
                            "--bind-later")["lease"]  # fmt: skip
    outer = tenant_cgroup(cgroup_parents, hierarchy, "outer")
    agent.cli_json("lease", "bind", first["id"], "--cgroup", str(outer))
    inner = outer / "inner"
    inner.mkdir()
    nested = agent.cli("lease", "bind", second["id"], "--cgroup", str(inner))
    assert nested.returncode == 2 and "must not nest" in nested.stderr
    outside = agent.cli("lease", "bind", second["id"], "--cgroup", "/sys/fs/cgroup")
    assert outside.returncode == 2 and "not strictly under an allowed parent" in outside.stderr
    inner.rmdir()
    # Released while unbound: revoked (nothing to revoke), evicted, scrubbed like any lease.
    released = agent.cli_json("lease", "release", second["id"])
    assert released["state"] == "free" and released["clean"] is True
    assert agent.cli_json("lease", "release", first["id"])["clean"] is True
