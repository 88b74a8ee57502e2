from __future__ import annotations

import errno
import time
from pathlib import Path

from tests.leases.helpers import any_tenant_cgroup
from tests.support import RunningAgent, probe, wait_all_clean


def test_ttl_is_enforced_by_the_agent(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    agent = lease_agent
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=1")
    wait_all_clean(agent)
    cgroup = any_tenant_cgroup(cgroup_parents, "ttl")
    grant = agent.cli_json(
        "lease",
        "grant",
        "--tenant",
        "t",
        "--profile",
        "1g.10gb",
        "--cgroup",
        str(cgroup),
        "--ttl",
        "1",
    )
    nodes = grant["partition"]["device_nodes"]
    assert set(probe(cgroup, nodes).values()) == {errno.ENXIO}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        [lease] = agent.cli_json("lease", "list", "--all")["leases"]
        if lease["state"] == "released":
            break
        time.sleep(0.1)
    assert lease["state"] == "released" and lease["release_reason"] == "expired"
    assert set(probe(cgroup, nodes).values()) == {errno.EPERM}
    [partition] = wait_all_clean(agent)
    assert partition["clean"] is True
