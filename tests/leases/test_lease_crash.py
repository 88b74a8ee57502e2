"""SIGKILL the agent at every step of grant, release, evict and scrub; restart; check the five
invariants: no dirty partition is free or leased, no revoked tenant has access, no holder is
left, nothing is lost, every partition ends free (clean) or quarantined with a reason."""

from __future__ import annotations

import errno
import signal
import subprocess
from pathlib import Path

import pytest

from agent.runtime.failpoints import ENVIRONMENT_VARIABLE, CrashPoint
from tests.leases.helpers import any_tenant_cgroup, hold, reap
from tests.support import RunningAgent, all_gpu_nodes, probe, wait_all_clean, wait_settled

GRANT_POINTS = sorted(p for p in CrashPoint if p.startswith("lease.grant."))
RELEASE_POINTS = sorted(p for p in CrashPoint if p.startswith("lease.release."))
SCRUB_POINTS = [CrashPoint.SCRUB_AFTER_JOURNAL, CrashPoint.SCRUB_AFTER_SCRUB]
# tests/foundation/test_failpoints.py checks that the crash tests together cover every point.
COVERED = frozenset([*GRANT_POINTS, *RELEASE_POINTS, *SCRUB_POINTS])


def _restart_with(agent: RunningAgent, point: str) -> None:
    agent.stop(signal.SIGTERM)
    agent.start(env={ENVIRONMENT_VARIABLE: point})


def _killed(agent: RunningAgent) -> None:
    assert agent.wait_exit(timeout=60) == -signal.SIGKILL, agent.log()[-2000:]


def _check_invariants(
    agent: RunningAgent, cgroup: Path, holders: list[subprocess.Popen[str]]
) -> None:
    agent.start()
    partitions = wait_settled(agent)
    for partition in partitions:
        assert partition["state"] in ("free", "quarantined")
        assert partition["state"] != "free" or partition["clean"]
        assert partition["state"] != "quarantined" or partition["reason"]
        assert not partition["holder"]
    # No revoked tenant has access to any GPU node.
    denied = probe(cgroup, all_gpu_nodes(agent.config.devices.dev_root))
    assert set(denied.values()) == {errno.EPERM}, denied
    for process in holders:
        assert reap(process) < 0  # evicted, not exited on its own
    # Nothing lost: every lease is in the journal, released.
    leases = agent.cli_json("lease", "list", "--all")["leases"]
    assert leases and all(lease["state"] == "released" for lease in leases)


@pytest.mark.parametrize("point", GRANT_POINTS)
def test_crash_during_grant(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path], point: str
) -> None:
    agent = lease_agent
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=1")
    wait_all_clean(agent)
    cgroup = any_tenant_cgroup(cgroup_parents, "t")
    _restart_with(agent, point)
    result = agent.cli(
        "lease", "grant", "--tenant", "t", "--profile", "1g.10gb", "--cgroup", str(cgroup)
    )
    assert result.returncode != 0
    _killed(agent)
    _check_invariants(agent, cgroup, [])


@pytest.mark.parametrize("point", RELEASE_POINTS + SCRUB_POINTS)
def test_crash_during_release(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path], point: str
) -> None:
    agent = lease_agent
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=1")
    wait_all_clean(agent)
    cgroup = any_tenant_cgroup(cgroup_parents, "t")
    grant = agent.cli_json(
        "lease", "grant", "--tenant", "t", "--profile", "1g.10gb", "--cgroup", str(cgroup)
    )
    holder = hold(agent, grant["partition"]["uuid"], "--cgroup", str(cgroup))
    _restart_with(agent, point)
    result = agent.cli("lease", "release", grant["lease"]["id"])
    assert result.returncode != 0
    _killed(agent)
    _check_invariants(agent, cgroup, [holder])
