"""Concurrent admin calls: the fence and the journal end up right whatever the interleaving."""

from __future__ import annotations

import errno
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agent.admin.client import AdminClient
from agent.errors import AccelguardError
from agent.proto.accelguard.v1 import admin_pb2 as pb
from tests.leases.helpers import any_tenant_cgroup
from tests.support import RunningAgent, probe, wait_all_clean


def test_parallel_grants_to_one_cgroup_fence_both(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    agent = lease_agent
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=4")
    wait_all_clean(agent)
    cgroup = any_tenant_cgroup(cgroup_parents, "parallel")
    request = pb.GrantLeaseRequest(tenant="p", profile="1g.10gb", cgroup=str(cgroup))

    def grant() -> pb.GrantLeaseResponse:
        with AdminClient(agent.config.admin.socket) as client:
            return client.grant_lease(request)

    with ThreadPoolExecutor(4) as pool:
        grants = list(pool.map(lambda _: grant(), range(4)))
    assert len({g.partition.uuid for g in grants}) == 4
    nodes = sorted({n for g in grants for n in g.partition.device_nodes})
    assert set(probe(cgroup, nodes).values()) == {errno.ENXIO}


def test_parallel_releases_of_one_lease_release_it_once(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    agent = lease_agent
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=1")
    wait_all_clean(agent)
    cgroup = any_tenant_cgroup(cgroup_parents, "twice")
    grant = agent.cli_json(
        "lease", "grant", "--tenant", "t", "--profile", "1g.10gb", "--cgroup", str(cgroup)
    )

    def release() -> str:
        with AdminClient(agent.config.admin.socket) as client:
            try:
                return client.release_lease(grant["lease"]["id"]).state
            except AccelguardError as error:
                return str(error)

    with ThreadPoolExecutor(3) as pool:
        outcomes = list(pool.map(lambda _: release(), range(3)))
    # Every caller joins the one release and gets its outcome; the work is done once.
    assert outcomes == ["free", "free", "free"], outcomes
    [lease] = agent.cli_json("lease", "list", "--all")["leases"]
    assert lease["state"] == "released"
    [partition] = wait_all_clean(agent)
    assert partition["clean"] is True
    certificates = agent.cli_json("scrub", "certs", "--partition", partition["uuid"])[
        "certificates"
    ]
    after_lease = [c for c in certificates if c["payload"]["previous_lease_id"] == lease["id"]]
    assert len(after_lease) == 1, certificates
    # Releasing it again answers the recorded outcome, exit 0, and scrubs nothing more.
    again = agent.cli("lease", "release", lease["id"])
    assert again.returncode == 0, again.stderr
    assert "free  clean" in again.stdout
    assert len(
        agent.cli_json("scrub", "certs", "--partition", partition["uuid"])["certificates"]
    ) == len(certificates)
