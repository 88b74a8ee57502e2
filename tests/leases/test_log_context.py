"""Every line of a lease's life carries who and what: node, lease, partition, tenant."""

from __future__ import annotations

import json
from pathlib import Path

from tests.leases.helpers import any_tenant_cgroup, layout_clean
from tests.support import RunningAgent


def test_release_lines_name_the_node_lease_partition_and_tenant(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    agent = lease_agent
    layout_clean(agent, "1g.10gb=1")
    cgroup = any_tenant_cgroup(cgroup_parents, "ctx")
    grant = agent.cli_json(
        "lease", "grant", "--tenant", "ctx-tenant", "--profile", "1g.10gb", "--cgroup", str(cgroup)
    )
    agent.cli_json("lease", "release", grant["lease"]["id"])
    lines = [json.loads(line) for line in agent.log().splitlines() if line.startswith("{")]
    assert all(line.get("node") == agent.config.node.id for line in lines[1:]), lines[:3]
    lease_lines = [
        line
        for line in lines
        if line["event"]
        in ("lease_granted", "lease_releasing", "scrub_started", "partition_scrubbed")
        and line.get("lease") == grant["lease"]["id"]
    ]
    events = {line["event"] for line in lease_lines}
    assert events == {"lease_granted", "lease_releasing", "scrub_started", "partition_scrubbed"}
    for line in lease_lines:
        assert line["tenant"] == "ctx-tenant", line
        assert line["partition"] == grant["partition"]["uuid"], line
