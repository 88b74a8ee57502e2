"""Real cgroups (v1 devices and v2) for tenants, and an agent allowed to fence under them."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.isolation.cgroups import hierarchy_mounts
from agent.sim.node import init_sim_node
from tests.support import RunningAgent, running_agent


def _remove_cgroup_tree(root: Path) -> None:
    if not root.exists():
        return
    for directory in [*sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True), root]:
        for _ in range(50):
            procs = directory / "cgroup.procs"
            pids = procs.read_text().split() if procs.exists() else []
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.05)
        with contextlib.suppress(OSError):
            directory.rmdir()


@pytest.fixture
def cgroup_parents() -> Iterator[dict[str, Path]]:
    name = f"accelguard-test-{uuid.uuid4().hex[:8]}"
    parents: dict[str, Path] = {}
    v2 = hierarchy_mounts("v2")
    v1 = hierarchy_mounts("v1-devices")
    if v2:
        parents["v2"] = v2[0] / name
    if v1:
        parents["v1"] = v1[0] / name
    for path in parents.values():
        path.mkdir()
    try:
        yield parents
    finally:
        for path in parents.values():
            _remove_cgroup_tree(path)


@pytest.fixture(params=["v2", "v1"])
def hierarchy(request: pytest.FixtureRequest, cgroup_parents: dict[str, Path]) -> str:
    if request.param not in cgroup_parents:
        pytest.skip(f"this machine has no cgroup {request.param} device hierarchy mounted")
    return str(request.param)


@pytest.fixture
def lease_agent(tmp_path: Path, cgroup_parents: dict[str, Path]) -> Iterator[RunningAgent]:
    node = init_sim_node(
        tmp_path / "node",
        "h100x2",
        cgroup_parents=list(cgroup_parents.values()),
        slice_bytes=1 << 20,
    )
    with running_agent(node) as running:
        yield running
