"""A process is its thread group, whatever its threads did (agent/isolation/census.py).

An adversarial tenant can hide a descriptor from /proc/PID/fd two ways: a thread with a
descriptor table of its own (``unshare(CLONE_FILES)``), or a leader that exits (the raw exit
syscall, as ``pthread_exit`` in C) while a thread holds the process's table; the leader is then a
zombie, and a zombie was judged to hold nothing. Both the kernel's census and the /proc census
must find such a holder under the group's pid; the release then evicts it when it is the
tenant's, and quarantines the partition naming it when it is not: never ``free clean`` with the
holder still there. Real processes, real cgroups, a real agent.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.hw.devnodes import DeviceNode
from agent.isolation.census import NodeTargets, is_alive, process_nodes, take_census
from agent.sim.node import init_sim_node
from tests.leases.helpers import any_tenant_cgroup, grant_capability, reap
from tests.support import RunningAgent, ready_child, running_agent

SHAPES = ["own-table", "leader-exited"]

# argv: the node file, the shape. Prints "ready" once only a thread holds the node.
THREADED = """
import ctypes, os, signal, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
CLONE_FILES = 0x400
SYS_EXIT = {"x86_64": 60, "aarch64": 93}[os.uname().machine]
path, shape = sys.argv[1], sys.argv[2]
leader = os.getpid()
opened = threading.Event()

def leader_state():
    return open(f"/proc/{leader}/stat").read().rsplit(")", 1)[1].split()[0]

def hold():
    if shape == "own-table" and libc.unshare(CLONE_FILES) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_FILES)")
    if shape == "leader-exited-mapping":
        import mmap
        with open(path, "rb") as handle:
            mapping = mmap.mmap(handle.fileno(), 4096, mmap.MAP_PRIVATE, mmap.PROT_READ)
        # The descriptor is closed: only the mapping, which the threads share, holds it.
    else:
        descriptor = os.open(path, os.O_PATH)
    opened.set()
    while shape.startswith("leader-exited") and leader_state() != "Z":
        time.sleep(0.01)
    if shape == "own-table":
        assert not any(os.path.samestat(os.stat(f"/proc/{leader}/fd/{n}"), os.stat(path))
                       for n in os.listdir(f"/proc/{leader}/fd")), "the leader's table has it"
    print("ready", flush=True)
    while True:
        time.sleep(60)

threading.Thread(target=hold).start()
opened.wait()
if shape.startswith("leader-exited"):
    # The main thread ends (ctypes lets go of the GIL first); the thread holds the table on.
    libc.syscall(ctypes.c_long(SYS_EXIT), ctypes.c_long(0))
signal.pause()
"""


@contextmanager
def threaded_holder(
    node_path: Path | str, shape: str, cgroup: Path | None = None
) -> Iterator[subprocess.Popen[str]]:
    """A process whose only hold on ``node_path`` is a thread's, in ``cgroup`` from its start."""
    command = [sys.executable, "-c", THREADED, str(node_path), shape]
    if cgroup is not None:
        command = ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh", *command]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    with ready_child(process):
        yield process


# A character device number no driver of the test machine uses (mem stops at minor 12), and
# /dev/zero's: the one device a test can map (privately, through a node file of its own).
UNUSED = (1, 240)
ZERO = (1, 5)


@pytest.mark.parametrize("shape", [*SHAPES, "leader-exited-mapping"])
@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "proc"])
def test_a_threads_hold_is_its_processs(tmp_path: Path, use_kernel: bool, shape: str) -> None:
    numbers = ZERO if shape.endswith("mapping") else UNUSED
    path = tmp_path / "nvidia-cap-a"
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(*numbers))
    node = DeviceNode(path, *numbers)
    targets = NodeTargets.of([node], [node])
    with threaded_holder(node.path, shape) as holder:
        assert is_alive(holder.pid)
        assert process_nodes(holder.pid, targets) == {node}
        census = take_census(targets, use_kernel=use_kernel)
        assert census.method == ("kernel" if use_kernel else "proc")
        # Other processes of the machine may map /dev/zero too: ours must be found, and alone
        # where the node is one nobody else has.
        shared = shape.endswith("mapping")
        assert {p for p in census.holders if p == holder.pid or not shared} == {holder.pid}
        assert census.holders[holder.pid].nodes == {node}
    # Killed: the group and its threads are gone, and hold nothing.
    assert not is_alive(holder.pid)
    assert holder.pid not in take_census(targets, use_kernel=use_kernel).holders


@contextmanager
def agent_with_census(
    tmp_path: Path, parents: dict[str, Path], census: str
) -> Iterator[RunningAgent]:
    node = init_sim_node(
        tmp_path / "node", "h100x2", cgroup_parents=list(parents.values()), slice_bytes=1 << 20
    )
    text = node.config_path.read_text()
    assert 'census = "auto"' in text
    node.config_path.write_text(text.replace('census = "auto"', f'census = "{census}"'))
    with running_agent(node) as agent:
        yield agent


@pytest.mark.parametrize("census", ["auto", "proc"])
def test_the_tenants_threads_are_evicted(
    tmp_path: Path, cgroup_parents: dict[str, Path], census: str
) -> None:
    cgroup = any_tenant_cgroup(cgroup_parents, "tenant-tia")
    with agent_with_census(tmp_path, cgroup_parents, census) as agent:
        lease, _, capability = grant_capability(agent, cgroup, "3g.40gb", "tia")
        with (
            threaded_holder(capability, "own-table", cgroup) as own_table,
            threaded_holder(capability, "leader-exited", cgroup) as leader_exited,
        ):
            released = agent.cli_json("lease", "release", lease)
            assert reap(own_table) == -15 and reap(leader_exited) == -15
        assert released["state"] == "free" and released["clean"] is True, released


@pytest.mark.parametrize("census", ["auto", "proc"])
@pytest.mark.parametrize("shape", SHAPES)
def test_an_outsiders_thread_quarantines_the_partition(
    tmp_path: Path, cgroup_parents: dict[str, Path], census: str, shape: str
) -> None:
    cgroup = any_tenant_cgroup(cgroup_parents, "tenant-tia")
    with agent_with_census(tmp_path, cgroup_parents, census) as agent:
        lease, _, capability = grant_capability(agent, cgroup, "3g.40gb", "tia")
        with threaded_holder(capability, shape) as outsider:
            result = agent.cli("lease", "release", lease, "--json")
            # Not NVML's, not the tenant's: neither killed nor overlooked.
            assert outsider.poll() is None
        released = json.loads(result.stdout)
        assert result.returncode == 3, (released, result.stderr)
        assert released["state"] == "quarantined", released
        assert f"pid {outsider.pid} (uid 0" in released["reason"], released
