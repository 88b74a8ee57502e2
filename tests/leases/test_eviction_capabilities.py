"""Eviction under exactly the capability bounding set of the shipped systemd unit.

The agent runs under ``setpriv --bounding-set`` built from the unit's ``CapabilityBoundingSet``
line, and another user's process (uid 65534) holds a MIG capability node of the leased
partition. With the unit's set the agent sees that process: it evicts it when it is the
tenant's, and quarantines the partition naming it when it is not. Without CAP_SYS_PTRACE the
kernel refuses to show the agent that process's descriptors, and the release must fail closed
instead of skipping it and reporting ``free clean``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.sim.node import init_sim_node
from tests.leases.helpers import any_tenant_cgroup, grant_capability
from tests.support import ACCELGUARD, REPO, RunningAgent

UNIT = REPO / "systemd" / "accelguard.service"
NOBODY = 65534

pytestmark = pytest.mark.skipif(
    shutil.which("setpriv") is None or shutil.which("capsh") is None,
    reason="needs setpriv (util-linux) to bound the agent's capabilities and capsh to decode them",
)


def unit_capabilities() -> list[str]:
    """The capability names of the unit's CapabilityBoundingSet lines (systemd adds them up)."""
    names: list[str] = []
    for line in UNIT.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            values = line.partition("=")[2].split()
            assert not any(v.startswith("~") for v in values), "a deny list is not parsed here"
            names += [v.lower() for v in values]
    assert names, f"{UNIT} has no CapabilityBoundingSet"
    return names


def _bounding_set(pid: int) -> set[str]:
    status = Path(f"/proc/{pid}/status").read_text()
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("CapBnd:"))
    decoded = subprocess.run(
        ["capsh", f"--decode={mask}"], capture_output=True, text=True, check=True
    ).stdout
    return {name for name in decoded.strip().partition("=")[2].split(",") if name}


@contextmanager
def bounded_agent(
    tmp_path: Path, cgroup_parents: dict[str, Path], capabilities: list[str], census: str = "auto"
) -> Iterator[RunningAgent]:
    node = init_sim_node(
        tmp_path / "node", "h100x2", cgroup_parents=list(cgroup_parents.values()),
        slice_bytes=1 << 20,
    )  # fmt: skip
    if census != "auto":
        text = node.config_path.read_text()
        node.config_path.write_text(text.replace('census = "auto"', f'census = "{census}"'))
    running = RunningAgent(node=node, config=load_config(node.config_path))
    running.log_path = node.root / "agent-bounded.log"
    # setpriv spells capabilities without the "cap_" prefix.
    bounding = ",".join(["-all", *(f"+{name.removeprefix('cap_')}" for name in capabilities)])
    with running.log_path.open("w") as log:
        # setpriv execs the agent, so the pid is the agent's; as root, its permitted and
        # effective sets become exactly the bounding set, as under the unit.
        running.process = subprocess.Popen(
            ["setpriv", f"--bounding-set={bounding}", "--no-new-privs", "--",
             *ACCELGUARD, "--config", str(node.config_path), "agent"],
            stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        )  # fmt: skip
    try:
        running.wait_ready()
        # A machine may lack some of the unit's capabilities itself; never more than the unit.
        assert _bounding_set(running.process.pid) <= set(capabilities), running.log()
        yield running
    finally:
        if running.process is not None:
            running.stop(signal.SIGKILL)


@contextmanager
def other_user_holder(
    node_path: str, cgroup: Path | None = None
) -> Iterator[subprocess.Popen[str]]:
    """A process of uid 65534 holding ``node_path`` by an O_PATH descriptor.

    The descriptor is opened here and inherited, because the simulated node's directory is not
    searchable by that user (and a real driver's open fails with ENXIO on a simulated node).
    """
    descriptor = os.open(node_path, os.O_PATH)
    try:
        process = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--",
             "sleep", "infinity"],
            pass_fds=(descriptor,), text=True,
        )  # fmt: skip
    finally:
        os.close(descriptor)
    try:
        _wait_until_sleeping_as_nobody(process.pid)
        held = Path(f"/proc/{process.pid}/fd/{descriptor}").stat().st_rdev
        assert held == Path(node_path).stat().st_rdev
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(process.pid))
        yield process
    finally:
        process.kill()
        process.wait(timeout=30)


def _wait_until_sleeping_as_nobody(pid: int) -> None:
    for _ in range(200):
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields["Name"].strip() == "sleep" and fields["Uid"].split()[0] == str(NOBODY):
            return
        time.sleep(0.025)
    raise AssertionError(f"pid {pid} never became uid {NOBODY} running sleep")


def _release(agent: RunningAgent, lease: str) -> dict[str, Any]:
    result = agent.cli("lease", "release", lease, "--json")
    document: dict[str, Any] = json.loads(result.stdout)
    # Exit 0 exactly when free and clean, 3 when it ended quarantined (the CLI's contract).
    assert result.returncode == (0 if document.get("clean") else 3), result.stderr
    return document


def test_the_unit_grants_what_the_scan_needs() -> None:
    assert "cap_sys_ptrace" in unit_capabilities()


def test_other_users_holder_outside_the_cgroup_quarantines(
    tmp_path: Path, cgroup_parents: dict[str, Path]
) -> None:
    cgroup = any_tenant_cgroup(cgroup_parents, "tenant-nora")
    with bounded_agent(tmp_path, cgroup_parents, unit_capabilities()) as agent:
        lease, _, capability = grant_capability(agent, cgroup, "2g.20gb", "nora")
        with other_user_holder(capability) as holder:
            released = _release(agent, lease)
            # Not NVML's, not the tenant's: neither killed nor overlooked.
            assert holder.poll() is None
        assert released["state"] == "quarantined" and not released.get("clean"), released
        reason = released["reason"]
        assert f"pid {holder.pid} (uid {NOBODY}" in reason and capability in reason, reason


def test_other_users_holder_in_the_cgroup_is_evicted(
    tmp_path: Path, cgroup_parents: dict[str, Path]
) -> None:
    cgroup = any_tenant_cgroup(cgroup_parents, "tenant-nora")
    with bounded_agent(tmp_path, cgroup_parents, unit_capabilities()) as agent:
        lease, _, capability = grant_capability(agent, cgroup, "2g.20gb", "nora")
        with other_user_holder(capability, cgroup) as holder:
            released = _release(agent, lease)
            assert holder.wait(timeout=30) == -signal.SIGTERM
        assert released["state"] == "free" and released["clean"] is True, released


@pytest.mark.parametrize("census", ["auto", "proc"])
def test_without_ptrace_the_release_fails_closed(
    tmp_path: Path, cgroup_parents: dict[str, Path], census: str
) -> None:
    """The kernel's census sees the other user's holder without CAP_SYS_PTRACE; /proc cannot,
    and says so: either way the partition is quarantined, never freed."""
    capabilities = [c for c in unit_capabilities() if c != "cap_sys_ptrace"]
    cgroup = any_tenant_cgroup(cgroup_parents, "tenant-nora")
    with bounded_agent(tmp_path, cgroup_parents, capabilities, census) as agent:
        lease, _, capability = grant_capability(agent, cgroup, "2g.20gb", "nora")
        with other_user_holder(capability) as holder:
            released = _release(agent, lease)
            assert holder.poll() is None
        assert released["state"] == "quarantined" and not released.get("clean"), released
        reason = released["reason"]
        if census == "auto":
            assert f"pid {holder.pid} (uid {NOBODY}" in reason and capability in reason, reason
        else:
            assert "scan" in reason and "CAP_SYS_PTRACE" in reason, released
