"""Release evicts every holder (SIGTERM, grace, kill) before the scrub; outsiders too."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.leases.conftest import tenant_cgroup
from tests.support import ACCELGUARD, REPO, RunningAgent, wait_all_clean


def _hold(agent: RunningAgent, partition: str, *extra: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [*ACCELGUARD, "--config", str(agent.config_path), "sim", "hold", "--partition", partition,
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("holding"), process.stderr.read() if process.stderr else line
    return process


def reap(process: subprocess.Popen[str]) -> int:
    """Wait for an evicted holder and close its pipes; returns its exit status."""
    code = process.wait(timeout=30)
    for pipe in (process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()
    return code


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
    polite = _hold(agent, partition, "--cgroup", str(cgroup))
    stubborn = _hold(agent, partition, "--cgroup", str(cgroup), "--ignore-sigterm")
    # A process outside the tenant's cgroup that NVML reports on the instance.
    outsider = _hold(agent, partition)
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
