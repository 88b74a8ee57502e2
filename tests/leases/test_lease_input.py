"""Bad input: one clear line, a non-zero exit, and no state change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.leases.helpers import tenant_cgroup
from tests.support import RunningAgent, wait_all_clean


def _snapshot(agent: RunningAgent) -> tuple[Any, Any]:
    return (
        agent.cli_json("partition", "list")["partitions"],
        agent.cli_json("lease", "list", "--all")["leases"],
    )


def _refused(agent: RunningAgent, *args: str) -> str:
    before = _snapshot(agent)
    result = agent.cli(*args)
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert _snapshot(agent) == before
    return lines[0]


@pytest.fixture
def ready(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> tuple[RunningAgent, Path, dict[str, Any]]:
    lease_agent.cli_json("layout", "apply", "--gpu", "0", "2g.20gb=1", "1g.10gb=1")
    wait_all_clean(lease_agent)
    hierarchy = "v2" if "v2" in cgroup_parents else "v1"
    cgroup = tenant_cgroup(cgroup_parents, hierarchy, "tenant")
    grant = lease_agent.cli_json(
        "lease", "grant", "--tenant", "t1", "--profile", "2g.20gb", "--cgroup", str(cgroup)
    )
    return lease_agent, cgroup, grant


def _grant(agent: RunningAgent, cgroup: str, *selector: str) -> str:
    return _refused(agent, "lease", "grant", "--tenant", "t2", *selector, "--cgroup", cgroup)


def test_bad_cgroup_paths(ready: tuple[RunningAgent, Path, dict[str, Any]], tmp_path: Path) -> None:
    agent, cgroup, _ = ready
    parent = cgroup.parent
    assert ".." in _grant(agent, f"{parent}/tenant/../tenant", "--profile", "1g.10gb")
    outside = parent.parent
    assert "not strictly under an allowed parent" in _grant(
        agent, str(outside), "--profile", "1g.10gb"
    )
    # cgroupfs refuses symlinks inside it, so a symlink can only lead in from outside.
    link = tmp_path / "escape"
    link.symlink_to(cgroup)
    assert "not strictly under an allowed parent" in _grant(
        agent, str(link), "--profile", "1g.10gb"
    )
    assert "exist" in _grant(agent, str(parent / "nope"), "--profile", "1g.10gb")
    assert "absolute" in _grant(agent, "relative/path", "--profile", "1g.10gb")
    assert "not strictly under an allowed parent" in _grant(
        agent, str(tmp_path), "--profile", "1g.10gb"
    )


def test_unknown_and_ungrantable_partitions(
    ready: tuple[RunningAgent, Path, dict[str, Any]],
) -> None:
    agent, cgroup, grant = ready
    leased = grant["partition"]["uuid"]
    assert "does not exist" in _grant(
        agent, str(cgroup), "--partition", "MIG-00000000-0000-0000-0000-000000000000"
    )
    assert "leased" in _grant(agent, str(cgroup), "--partition", leased)
    assert "2g.20gb" in _grant(agent, str(cgroup), "--profile", "2g.20gb")
    assert "7g.80gb" in _grant(agent, str(cgroup), "--profile", "7g.80gb")
    free = next(
        p["uuid"] for p in agent.cli_json("partition", "list")["partitions"] if p["state"] == "free"
    )
    agent.cli_json("partition", "quarantine", free, "--reason", "ECC storm")
    assert "quarantined" in _grant(agent, str(cgroup), "--partition", free)
    assert "tenant" in _refused(
        agent,
        "lease",
        "grant",
        "--tenant",
        "bad tenant!",
        "--profile",
        "1g.10gb",
        "--cgroup",
        str(cgroup),
    )


def test_unknown_lease_and_double_release(ready: tuple[RunningAgent, Path, dict[str, Any]]) -> None:
    agent, _, grant = ready
    assert "does not exist" in _refused(agent, "lease", "release", "lease-nope")
    assert agent.cli("lease", "release", "lease-nope").returncode == 4  # not found
    first = agent.cli_json("lease", "release", grant["lease"]["id"])
    # Idempotent: a second release answers the recorded outcome, with the same exit code.
    again = agent.cli("lease", "release", grant["lease"]["id"], "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["state"] == first["state"] == "free"


def test_quarantine_and_clear(ready: tuple[RunningAgent, Path, dict[str, Any]]) -> None:
    agent, _, grant = ready
    assert "release its lease first" in _refused(
        agent, "partition", "quarantine", grant["partition"]["uuid"], "--reason", "x"
    )
    free = next(
        p["uuid"] for p in agent.cli_json("partition", "list")["partitions"] if p["state"] == "free"
    )
    assert "not quarantined" in _refused(agent, "partition", "clear", free, "--reason", "x")
    quarantined = agent.cli_json("partition", "quarantine", free, "--reason", "XID 79")
    assert quarantined["state"] == "quarantined" and "XID 79" in quarantined["reason"]
    cleared = agent.cli_json("partition", "clear", free, "--reason", "GPU replaced")
    assert cleared["state"] == "free" and cleared["clean"] is True
