"""Who may change the node: the admin socket knows each caller from the kernel (SO_PEERCRED,
agent/admin/peers.py). Root and members of admin.group may grant, release, apply layouts,
quarantine and clear; members of admin.read_group may only read; a refused call changes nothing
and is logged with who made it, as is every call that changes something."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.admin.client import AdminClient
from agent.admin.peers import MAX_CONNECTIONS, MAX_SOCKET_PATH, CallerGate
from agent.config import config_as_dict, load_config, parse_config, to_toml
from agent.errors import PermissionDeniedError
from agent.sim.node import init_sim_node
from tests.leases.helpers import any_tenant_cgroup
from tests.link.support import wait_for
from tests.support import REPO, RunningAgent, running_agent, wait_all_clean

NOBODY = 65534
SYSTEM_PYTHON = Path("/usr/bin/python3")
SITE = (
    Path(sys.prefix)
    / "lib"
    / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    / "site-packages"
)


def _system_python_matches() -> bool:
    if not SYSTEM_PYTHON.exists():
        return False
    result = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                            capture_output=True, text=True, check=False)  # fmt: skip
    return result.stdout.strip() == str(tuple(sys.version_info[:2]))


@pytest.fixture
def shared_agent(tmp_path: Path, cgroup_parents: dict[str, Path]) -> Iterator[RunningAgent]:
    """An agent whose socket lies where "nobody" can reach it: read group nogroup (nobody's),
    admin group adm (nobody is not in it)."""
    if not _system_python_matches():
        pytest.skip(f"no {SYSTEM_PYTHON} of this Python version to run the CLI as nobody")
    public = Path(tempfile.mkdtemp(prefix="ag-admin-"))
    public.chmod(0o755)
    node = init_sim_node(tmp_path / "node", "h100x2", cgroup_parents=list(cgroup_parents.values()),
                         mig_enabled=False, slice_bytes=1 << 20)  # fmt: skip
    document = config_as_dict(load_config(node.config_path))
    document["admin"].update({"socket": str(public / "admin.sock"), "socket_mode": "0660",
                              "group": "adm", "read_group": "nogroup"})  # fmt: skip
    node.config_path.write_text(to_toml(parse_config(document)))
    # nobody reads the config from the shared directory too.
    shared_config = public / "agent.toml"
    shutil.copy(node.config_path, shared_config)
    shared_config.chmod(0o644)
    try:
        with running_agent(node) as running:
            wait_for(lambda: len(running.partitions()) == 2, "the two GPUs' partitions")
            wait_all_clean(running)
            yield running
    finally:
        shutil.rmtree(public, ignore_errors=True)


def _as_nobody(agent: RunningAgent, *args: str) -> subprocess.CompletedProcess[str]:
    config = Path(agent.config.admin.socket).parent / "agent.toml"
    return subprocess.run(
        [SYSTEM_PYTHON, "-m", "agent.cli", "--config", str(config), *args],
        capture_output=True, text=True, timeout=60, check=False, cwd="/tmp",
        user=NOBODY, group=NOBODY, extra_groups=[],
        env={"PYTHONPATH": f"{REPO}{os.pathsep}{SITE}", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def _state(agent: RunningAgent) -> tuple[Any, Any]:
    return (agent.cli_json("partition", "list")["partitions"],
            agent.cli_json("lease", "list", "--all")["leases"])  # fmt: skip


def test_only_root_and_the_admin_group_change_the_node(
    shared_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    agent = shared_agent
    cgroup = any_tenant_cgroup(cgroup_parents, "alice")
    partition = agent.cli_json("partition", "list")["partitions"][0]["uuid"]
    # nobody (in read_group only) reads ...
    status = _as_nobody(agent, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["node_id"] == agent.config.node.id
    # ... and is refused every change, with one line that says why; nothing changes.
    before = _state(agent)
    for args in (
        ("lease", "grant", "--tenant", "alice", "--profile", "gpu", "--cgroup", str(cgroup)),
        ("partition", "quarantine", partition, "--reason", "mine now"),
        ("partition", "clear", partition, "--reason", "checked"),
        ("layout", "apply", "--gpu", "0", "3g.40gb=2"),
    ):
        refused = _as_nobody(agent, *args)
        assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
        assert refused.stderr.strip().splitlines() == [refused.stderr.strip()], refused.stderr
        assert "only root and members of the admin group (admin.group)" in refused.stderr
        assert f"uid {NOBODY}" in refused.stderr
    assert _state(agent) == before
    # Root changes it, and the log says who did.
    granted = agent.cli_json("lease", "grant", "--tenant", "alice", "--profile", "gpu",
                             "--cgroup", str(cgroup))  # fmt: skip
    released = agent.cli("lease", "release", granted["lease"]["id"])
    assert released.returncode == 0, released.stderr
    events = [json.loads(line) for line in agent.log().splitlines() if line.startswith("{")]
    refusals = [e for e in events if e.get("event") == "admin_call_refused"]
    assert {e["call"] for e in refusals} == {
        "GrantLease", "QuarantinePartition", "ClearPartition", "ApplyLayout"
    }  # fmt: skip
    changes = [e for e in events if e.get("event") == "admin_call"]
    assert [(e["call"], e["uid"]) for e in changes] == [("GrantLease", 0), ("ReleaseLease", 0)]
    assert all(e["pid"] > 0 for e in changes)
    # The audit log has one record per call: each refusal with nobody's uid and pid, each
    # change with root's.
    calls = [r for r in agent.cli_json("audit", "show")["records"]
             if r["action"].startswith("admin.")]  # fmt: skip
    assert sorted((r["action"], r["outcome"], r["actor"]["uid"]) for r in calls) == [
        ("admin.ApplyLayout", "denied", NOBODY), ("admin.ClearPartition", "denied", NOBODY),
        ("admin.GrantLease", "denied", NOBODY), ("admin.GrantLease", "ok", 0),
        ("admin.QuarantinePartition", "denied", NOBODY), ("admin.ReleaseLease", "ok", 0),
    ]  # fmt: skip
    assert all(r["actor"]["pid"] > 0 for r in calls)
    assert all("only root and members of the admin group" in r["detail"]["error"]
               for r in calls if r["outcome"] == "denied")  # fmt: skip


def test_a_call_that_bypasses_the_gate_has_no_caller(shared_agent: RunningAgent) -> None:
    """Only root can reach gRPC's own socket; even then, without the gate nobody is known."""
    public = Path(shared_agent.config.admin.socket)
    private = public.parent / f".{public.name}.d"
    assert private.stat().st_mode & 0o777 == 0o700
    with AdminClient(private / "g") as client, pytest.raises(PermissionDeniedError) as refused:
        client.status()
    assert "the caller is unknown" in str(refused.value)


def test_a_deep_socket_keeps_its_private_sockets_in_a_temporary_directory(tmp_path: Path) -> None:
    public = tmp_path / ("d" * max(1, 100 - len(str(tmp_path)))) / "admin.sock"
    gate = CallerGate(public)
    gate.prepare()
    try:
        assert gate.private.parent == Path(tempfile.gettempdir())
        assert gate.private.stat().st_mode & 0o777 == 0o700
        assert len(os.fsencode(gate.private / f"c{MAX_CONNECTIONS}")) <= MAX_SOCKET_PATH
    finally:
        asyncio.run(gate.close())
    assert not gate.private.exists()
