"""Fixtures for device-fence tests against the real kernel.

Tenant cgroups are made under the cgroup v2 and cgroup v1 ``devices`` mounts found in
/proc/self/mountinfo; device nodes are made with mknod in a temporary directory using majors no
driver has registered, so that opening one returns ENXIO when the cgroup allows it and EPERM when
a fence denies it. A probe runs a child process inside the tenant cgroup and reports the errno of
each open.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.isolation.cgroups import CgroupHierarchy, hierarchy_mounts

# Runs inside the tenant cgroup: waits until the parent has moved it there, then tries each
# operation and prints {name: errno or 0}. -I -S keeps it from reading site files after the move.
_PROBE_SOURCE = """
import json, os, sys
operations = json.loads(sys.argv[1])
sys.stdin.readline()
results = {}
for name, operation in operations.items():
    try:
        if operation[0] == "open":
            os.close(os.open(operation[1], operation[2]))
        else:
            os.mknod(operation[1], 0o600 | 0o020000, os.makedev(operation[2], operation[3]))
            os.unlink(operation[1])
        results[name] = 0
    except OSError as error:
        results[name] = error.errno
print(json.dumps(results))
"""

_PREFERRED_MAJORS = {"nvidia": 195, "nvidia-uvm": 510, "nvidia-caps": 511}
# Dynamic character majors (fs/char_dev.c: 234-254, then 384-511), tried if one above is taken.
_DYNAMIC_MAJORS = [*range(511, 383, -1), *range(254, 233, -1)]


def _registered_char_majors() -> set[int]:
    majors: set[int] = set()
    section = ""
    for line in Path("/proc/devices").read_text().splitlines():
        if line.endswith(":"):
            section = line
        elif section.startswith("Character") and line.strip():
            majors.add(int(line.split()[0]))
    return majors


@dataclass(frozen=True)
class SimDev:
    """A simulated /dev with NVIDIA-style nodes whose majors have no driver behind them."""

    root: Path
    gpu_major: int
    uvm_major: int
    caps_major: int

    @property
    def nvidiactl(self) -> Path:
        return self.root / "nvidiactl"

    @property
    def nvidia0(self) -> Path:
        return self.root / "nvidia0"

    @property
    def nvidia1(self) -> Path:
        return self.root / "nvidia1"

    @property
    def uvm(self) -> Path:
        return self.root / "nvidia-uvm"

    @property
    def uvm_tools(self) -> Path:
        return self.root / "nvidia-uvm-tools"

    def cap(self, minor: int) -> Path:
        return self.root / "nvidia-caps" / f"nvidia-cap{minor}"

    @property
    def gpu_nodes(self) -> tuple[Path, ...]:
        return (
            self.nvidiactl,
            self.nvidia0,
            self.nvidia1,
            self.uvm,
            self.uvm_tools,
            self.cap(1),
            self.cap(2),
        )

    @property
    def partition0(self) -> tuple[Path, ...]:
        """What a tenant of a MIG instance on GPU 0 gets: ctl, uvm, uvm-tools, GPU 0, GI/CI caps."""
        return (self.nvidiactl, self.uvm, self.uvm_tools, self.nvidia0, self.cap(1))


@pytest.fixture
def sim_dev(tmp_path: Path) -> SimDev:
    taken = _registered_char_majors()
    free = [major for major in _DYNAMIC_MAJORS if major not in taken]
    chosen: dict[str, int] = {}
    for name, preferred in _PREFERRED_MAJORS.items():
        usable = preferred not in taken and preferred not in chosen.values()
        chosen[name] = preferred if usable else next(m for m in free if m not in chosen.values())
    dev = SimDev(tmp_path / "dev", chosen["nvidia"], chosen["nvidia-uvm"], chosen["nvidia-caps"])
    (dev.root / "nvidia-caps").mkdir(parents=True)
    nodes = {
        dev.nvidiactl: (dev.gpu_major, 255),
        dev.nvidia0: (dev.gpu_major, 0),
        dev.nvidia1: (dev.gpu_major, 1),
        dev.uvm: (dev.uvm_major, 0),
        dev.uvm_tools: (dev.uvm_major, 1),
        dev.cap(1): (dev.caps_major, 1),
        dev.cap(2): (dev.caps_major, 2),
    }
    for path, (major, minor) in nodes.items():
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    return dev


ProbeResult = dict[str, int]


@dataclass
class Probe:
    """Runs operations in a short-lived child process placed in a cgroup first."""

    def open(self, cgroup: Path, paths: dict[str, Path], flags: int = os.O_RDWR) -> ProbeResult:
        return self.run(cgroup, {name: ["open", str(path), flags] for name, path in paths.items()})

    def mknod(self, cgroup: Path, path: Path, major: int, minor: int) -> int:
        return self.run(cgroup, {"mknod": ["mknod", str(path), major, minor]})["mknod"]

    def run(self, cgroup: Path, operations: dict[str, list[object]]) -> ProbeResult:
        child = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _PROBE_SOURCE, json.dumps(operations)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            (cgroup / "cgroup.procs").write_text(str(child.pid))
            output, _ = child.communicate("go\n", timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == 0, f"probe exited with {child.returncode}"
        results: ProbeResult = json.loads(output)
        return results


@pytest.fixture
def probe() -> Probe:
    return Probe()


def _remove_cgroup_tree(cgroup: Path) -> None:
    if not cgroup.exists():
        return
    for child in [entry for entry in cgroup.iterdir() if entry.is_dir()]:
        _remove_cgroup_tree(child)
    # Only processes our probes put here can be in a cgroup this fixture created.
    deadline = time.monotonic() + 10
    while True:
        pids = [int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            cgroup.rmdir()
        except OSError as error:
            if error.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
        else:
            return


def _make_cgroup(hierarchy: CgroupHierarchy) -> Iterator[Path]:
    mounts = hierarchy_mounts(hierarchy)
    if not mounts:
        pytest.skip(f"no {hierarchy} cgroup hierarchy is mounted (per /proc/self/mountinfo)")
    cgroup = mounts[0] / f"accelguard-test-{uuid.uuid4().hex[:12]}"
    cgroup.mkdir()
    try:
        yield cgroup
    finally:
        _remove_cgroup_tree(cgroup)


@pytest.fixture
def v2_cgroup() -> Iterator[Path]:
    yield from _make_cgroup("v2")


@pytest.fixture
def v1_cgroup() -> Iterator[Path]:
    yield from _make_cgroup("v1-devices")


@pytest.fixture(params=["v1-devices", "v2"])
def tenant_cgroup(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh tenant cgroup on each kind of hierarchy, for tests every backend must pass."""
    yield from _make_cgroup(request.param)
