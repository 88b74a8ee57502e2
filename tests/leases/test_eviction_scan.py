"""The holder scan against real processes and the real /proc: descriptors are matched by device
number whatever file they were opened through, mappings by the node file, exits are not errors,
and a process the kernel will not show fails the scan instead of being skipped."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.errors import ScanError
from agent.hw.devnodes import NVIDIA_MAJOR, DeviceNode
from agent.isolation.census import NodeTargets, process_nodes, take_census
from tests.support import ready_child

# A character device number no driver of the test machine uses: major 1 (mem) stops at minor 12.
UNUSED_MAJOR, UNUSED_MINOR = 1, 240

HOLD_DESCRIPTOR = """
import os, signal, sys
descriptor = os.open(sys.argv[1], os.O_PATH)
print("ready", flush=True)
signal.pause()
"""

HOLD_MAPPING = """
import mmap, os, signal, sys
with open(sys.argv[1], "r+b") as handle:
    mapping = mmap.mmap(handle.fileno(), 4096)
# The descriptor is closed: only the mapping still holds the file.
print("ready", flush=True)
signal.pause()
"""


@contextmanager
def child(code: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True
    )
    with ready_child(process):
        yield process


def _char_node(path: Path) -> DeviceNode:
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(UNUSED_MAJOR, UNUSED_MINOR))
    return DeviceNode(path, UNUSED_MAJOR, UNUSED_MINOR)


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "proc"])
def test_descriptor_matches_by_device_number_not_by_file(tmp_path: Path, use_kernel: bool) -> None:
    node = _char_node(tmp_path / "nvidia-cap-a")
    # Another node file with the same device number: a private mknod copy opens the same device.
    copy = _char_node(tmp_path / "nvidia-cap-copy")
    targets = NodeTargets.of([node], [node])
    # A bystander: the census scans every process (the test may run in a PID namespace of its
    # own, tools/xdist-python, where little else runs), and finds only the holder.
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        with child(HOLD_DESCRIPTOR, str(copy.path)) as holder:
            assert process_nodes(holder.pid, targets) == {node}
            census = take_census(targets, use_kernel=use_kernel)
            assert census.holders[holder.pid].nodes == {node}
            assert os.getpid() not in census.holders and bystander.pid not in census.holders
            if use_kernel:
                assert census.method == "kernel", "the kernel census fell back to /proc"
            else:
                assert census.descriptors > 0 and census.processes > 1
    finally:
        bystander.kill()
        bystander.wait(timeout=30)


def test_mapping_matches_by_node_file_after_the_descriptor_is_closed(tmp_path: Path) -> None:
    # A regular file stands in for the node file: a simulated node has no driver to map.
    mapped = tmp_path / "mapped"
    mapped.write_bytes(b"\0" * 4096)
    node = DeviceNode(mapped, UNUSED_MAJOR, UNUSED_MINOR)
    targets = NodeTargets.of([node], [node])
    with child(HOLD_MAPPING, str(mapped)) as holder:
        assert process_nodes(holder.pid, targets) == {node}


def test_a_process_that_exited_is_not_an_error(tmp_path: Path) -> None:
    node = _char_node(tmp_path / "nvidia-cap-a")
    targets = NodeTargets.of([node], [node])
    with child(HOLD_DESCRIPTOR, str(node.path)) as holder:
        pid = holder.pid
    assert process_nodes(pid, targets) is None


def test_only_capability_nodes_prove_an_outsider_uses_the_partition() -> None:
    nvidia0 = DeviceNode(Path("/dev/nvidia0"), NVIDIA_MAJOR, 0)
    ctl = DeviceNode(Path("/dev/nvidiactl"), NVIDIA_MAJOR, 255)
    cap = DeviceNode(Path("/dev/nvidia-caps/nvidia-cap21"), 508, 21)
    mig = NodeTargets.of([cap], [ctl, nvidia0, cap])
    whole_gpu = NodeTargets.of([nvidia0], [ctl, nvidia0])
    assert mig.exclusive == {cap}
    # nvidia-persistenced holds /dev/nvidiaN of every GPU: a whole GPU has no exclusive node.
    assert whole_gpu.exclusive == frozenset()
    assert whole_gpu.own == {nvidia0}


SCAN_ONE = """
import sys
from pathlib import Path
from agent.errors import ScanError
from agent.isolation.census import NodeTargets, process_nodes
from agent.hw.devnodes import DeviceNode
node = DeviceNode(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
targets = NodeTargets.of([node], [node])
try:
    print(sorted(str(n.path) for n in process_nodes(int(sys.argv[1]), targets)))
except ScanError as error:
    print(f"ScanError: {error}")
"""


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
@pytest.mark.parametrize("ptrace", [True, False])
def test_another_users_process_is_read_or_fails_the_scan(tmp_path: Path, ptrace: bool) -> None:
    node = _char_node(tmp_path / "nvidia-cap-a")
    descriptor = os.open(node.path, os.O_PATH)
    try:
        holder = subprocess.Popen(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
             "sleep", "infinity"],
            pass_fds=(descriptor,),
        )  # fmt: skip
    finally:
        os.close(descriptor)
    try:
        dropped = [] if ptrace else ["--bounding-set=-sys_ptrace"]
        result = subprocess.run(
            ["setpriv", *dropped, "--", sys.executable, "-c", SCAN_ONE, str(holder.pid),
             str(node.path), str(node.major), str(node.minor)],
            capture_output=True, text=True, check=True, timeout=60,
            cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip
    finally:
        holder.kill()
        holder.wait(timeout=30)
    if ptrace:
        assert result.stdout.strip() == repr([str(node.path)]), result
    else:
        assert result.stdout.startswith("ScanError:"), result
        assert f"/proc/{holder.pid}/fd" in result.stdout and "CAP_SYS_PTRACE" in result.stdout


def test_scan_error_is_an_eviction_error() -> None:
    from agent.errors import AccelguardError, EvictionError  # noqa: PLC0415

    error = ScanError(1, "fd/3", PermissionError(13, "Permission denied"))
    assert isinstance(error, EvictionError) and isinstance(error, AccelguardError)
