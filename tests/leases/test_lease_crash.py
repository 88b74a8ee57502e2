"""SIGKILL the agent at every step of grant, release, evict and scrub; restart; check the five
invariants: no dirty partition is free or leased, no revoked tenant has access, no holder is
left, nothing is lost, every partition ends free (clean) or quarantined with a reason."""

from __future__ import annotations

import errno
import signal
import subprocess
from pathlib import Path

import pytest

import agent.leases
import agent.scrub.simmem
from agent.failpoints import ENVIRONMENT_VARIABLE, KNOWN
from tests.leases.conftest import any_tenant_cgroup
from tests.leases.test_eviction import _hold, reap
from tests.support import RunningAgent, all_gpu_nodes, probe, wait_all_clean, wait_settled

assert agent.leases and agent.scrub.simmem  # imported for their failpoint registrations

GRANT_POINTS = sorted(n for n in KNOWN if n.startswith("lease.grant."))
RELEASE_POINTS = sorted(n for n in KNOWN if n.startswith("lease.release."))
SCRUB_POINTS = ["scrub.after_journal", "scrub.after_scrub"]


def test_the_crash_points_cover_every_step() -> None:
    assert len(GRANT_POINTS) >= 3 and len(RELEASE_POINTS) >= 3
    assert set(SCRUB_POINTS) <= KNOWN


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
    holder = _hold(agent, grant["partition"]["uuid"], "--cgroup", str(cgroup))
    _restart_with(agent, point)
    result = agent.cli("lease", "release", grant["lease"]["id"])
    assert result.returncode != 0
    _killed(agent)
    _check_invariants(agent, cgroup, [holder])
