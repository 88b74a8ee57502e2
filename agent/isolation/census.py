"""The census of a partition's holders: which processes hold one of its device nodes, by open
descriptor (matched by ``st_rdev``, whatever file it was opened through) or by memory map.

Two ways to count, one answer (agent/isolation/evict.py says who is then evicted):

- asked of the kernel (agent/isolation/holder_iter.py): BPF iterators walk every open file and
  memory map in one pass, about 80 ns a descriptor, and no process is unreadable to them;
- read from /proc, where the kernel cannot answer (no BTF, an older kernel, no CAP_BPF): one
  ``stat`` per descriptor, microseconds each, and a process that cannot be read (EACCES without
  CAP_SYS_PTRACE, any error but its own exit) fails the scan: a scan that skipped a process
  proves nothing. The agent's ancestors (its supervisor) are the exception: one that cannot be
  read is logged, not a failure (see ``scan_skipped_ancestor`` in evict.py).

A process is its thread group, whatever its threads did: a thread may have a descriptor table of
its own (``unshare(CLONE_FILES)``, ``clone`` without ``CLONE_FILES``), which /proc/PID/fd does
not show, and a leader that exited before its threads is a zombie while they run on and hold its
table. Both counts read every distinct table of a group (``kcmp`` tells which threads share
one) and judge a group alive while any thread is; holders are named by the group's pid (the
kernel's iterators report the group leader's), the one cgroup.procs lists and a signal reaches.

Both are blocking: run them in a thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent.errors import ScanError
from agent.hw.devnodes import NVIDIA_MAJOR, DeviceNode
from agent.isolation import holder_iter
from agent.isolation.holder_iter import HolderIteratorError, kernel_rdev

log = structlog.get_logger(__name__)

# The process went away between listing and reading it: it holds nothing any more.
_GONE = (errno.ENOENT, errno.ESRCH)


_CAP_SYS_PTRACE = 19


def _has_ptrace_capability() -> bool:
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text()
        effective = next(line for line in status.splitlines() if line.startswith("CapEff:"))
        return bool(int(effective.split()[1], 16) >> _CAP_SYS_PTRACE & 1)
    return False


def _scan_error(pid: int, what: str, error: OSError) -> ScanError:
    """The ScanError for an unreadable ``/proc/<pid>/<what>``, saying why it may be refused."""
    hint = ""
    if error.errno in (errno.EACCES, errno.EPERM):
        hint = (
            " (refused despite CAP_SYS_PTRACE: a security module or sandbox hides it)"
            if _has_ptrace_capability()
            else " (the agent needs CAP_SYS_PTRACE to read other users' processes)"
        )
    return ScanError(pid, what, error, hint)


@dataclass(frozen=True)
class NodeTargets:
    """What a scan looks for: the partition's nodes by device number and by node file."""

    by_rdev: dict[int, DeviceNode]
    # (st_dev, st_ino) of each node file: /proc/PID/maps names a mapping's file this way.
    by_file: dict[tuple[int, int], DeviceNode]
    own: frozenset[DeviceNode]
    exclusive: frozenset[DeviceNode]
    # The inode numbers of by_file as /proc/PID/maps prints them, for a cheap first test.
    mapped_inodes: frozenset[bytes]

    @classmethod
    def of(cls, own_nodes: Iterable[DeviceNode], any_nodes: Iterable[DeviceNode]) -> NodeTargets:
        own = frozenset(own_nodes)
        every = own | frozenset(any_nodes)
        by_file: dict[tuple[int, int], DeviceNode] = {}
        for node in every:
            # A node file that is missing cannot be mapped through; descriptors still match by
            # st_rdev, whatever file they were opened through.
            with contextlib.suppress(OSError):
                info = node.path.stat()
                by_file[(info.st_dev, info.st_ino)] = node
        return cls(
            by_rdev={os.makedev(n.major, n.minor): n for n in every if n.kind == "c"},
            by_file=by_file,
            own=own,
            # /dev/nvidiaN is a whole GPU's own node, yet node services hold it on every GPU:
            # only a MIG capability node proves that an outsider reaches this very partition.
            exclusive=frozenset(n for n in own if n.major != NVIDIA_MAJOR),
            mapped_inodes=frozenset(str(ino).encode() for _, ino in by_file),
        )

    @property
    def every(self) -> frozenset[DeviceNode]:
        return frozenset(self.by_rdev.values()) | frozenset(self.by_file.values())


@dataclass(frozen=True)
class Holder:
    pid: int
    uid: int
    command: str
    nodes: frozenset[DeviceNode]


@dataclass
class Census:
    """Every process that holds one of the partition's nodes, from one pass over the node's
    processes: asked of the kernel (``method`` "kernel") or read from /proc ("proc", which
    alone counts ``processes`` and ``descriptors``)."""

    method: str = "proc"
    holders: dict[int, Holder] = field(default_factory=dict)
    skipped: list[ScanError] = field(default_factory=list)
    processes: int = 0
    descriptors: int = 0
    seconds: float = 0.0


def _stat_fields(pid: int, proc_root: Path) -> list[bytes]:
    """``/proc/PID/stat`` after the parenthesised command name (which may itself contain ')'):
    the state, then the parent's pid, ...; empty when the process is gone."""
    try:
        data = (proc_root / str(pid) / "stat").read_bytes()
    except OSError:
        return []
    return data[data.rfind(b")") + 2 :].split()


def _threads(pid: int, proc_root: Path) -> list[int]:
    """The thread ids of process ``pid``, its leader first; [] when it is gone."""
    try:
        names = os.listdir(proc_root / str(pid) / "task")  # noqa: PTH208 - names only
    except OSError:
        return []
    return sorted((int(n) for n in names if n.isdigit()), key=lambda tid: tid != pid)


def _live_threads(pid: int, proc_root: Path) -> list[int]:
    """The threads of ``pid`` other than its leader that have not exited."""
    task = proc_root / str(pid) / "task"
    return [
        tid
        for tid in _threads(pid, proc_root)[1:]
        if (state := _stat_fields(tid, task)) and state[0] not in (b"Z", b"X")
    ]


def is_alive(pid: int, proc_root: Path = Path("/proc")) -> bool:
    """A zombie has released its file descriptors and its GPU context: it is not a holder. A
    leader that exited before its threads is a zombie too, yet its process lives on in them."""
    fields = _stat_fields(pid, proc_root)
    if not fields or fields[0] == b"X":
        return False
    return fields[0] != b"Z" or bool(_live_threads(pid, proc_root))


# kcmp(2), include/uapi/linux/kcmp.h: KCMP_FILES compares two tasks' descriptor tables.
_KCMP_FILES = 2
_SYS_KCMP = {"x86_64": 312, "aarch64": 272}.get(platform.machine())
_libc = ctypes.CDLL(None, use_errno=True)


def _share_table(tid: int, other: int) -> bool:
    """Whether threads ``tid`` and ``other`` share one descriptor table. False when kcmp cannot
    tell (another architecture, no CONFIG_KCMP, EPERM): the thread's own table is then read,
    slower and never blind."""
    if _SYS_KCMP is None:
        return False
    answer = _libc.syscall(
        ctypes.c_long(_SYS_KCMP), ctypes.c_long(tid), ctypes.c_long(other),
        ctypes.c_long(_KCMP_FILES), ctypes.c_long(0), ctypes.c_long(0),
    )  # fmt: skip
    return bool(answer == 0)


def _tables(pid: int, proc_root: Path) -> list[str]:
    """The fd directories, below /proc/PID, of each distinct descriptor table of ``pid``'s
    threads: "fd" (the leader's) and "task/TID/fd" for each thread with a table of its own (or
    whose sharing kcmp cannot tell, or whose leader has exited and left no table)."""
    threads = _threads(pid, proc_root)
    if len(threads) <= 1:
        return ["fd"]
    read = [pid]
    tables = ["fd"]
    for tid in threads[1:]:
        if proc_root == Path("/proc") and any(_share_table(tid, seen) for seen in read):
            continue
        read.append(tid)
        tables.append(f"task/{tid}/fd")
    return tables


def _descriptor_nodes(
    pid: int, targets: NodeTargets, proc_root: Path, census: Census | None = None
) -> set[DeviceNode] | None:
    held: set[DeviceNode] = set()
    for table in _tables(pid, proc_root):
        found = _table_nodes(pid, table, targets, proc_root, census)
        if found is None:
            if table == "fd":
                return None  # the process is gone
            continue  # one thread exited meanwhile
        held |= found
    return held


def _table_nodes(
    pid: int, table: str, targets: NodeTargets, proc_root: Path, census: Census | None
) -> set[DeviceNode] | None:
    try:
        directory = os.open(proc_root / str(pid) / table, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        if error.errno in _GONE:
            return None
        raise _scan_error(pid, table, error) from error
    held: set[DeviceNode] = set()
    by_rdev = targets.by_rdev
    try:
        names = os.listdir(directory)  # noqa: PTH208 - by descriptor; Path cannot
        if census is not None:
            census.descriptors += len(names)
        for name in names:
            try:
                # Through the fd directory, so the kernel resolves one name, not a whole path.
                info = os.stat(name, dir_fd=directory)
            except OSError as error:
                if error.errno in _GONE:
                    continue  # closed meanwhile (or the process exited: its maps say so)
                raise _scan_error(pid, f"{table}/{name}", error) from error
            node = by_rdev.get(info.st_rdev)
            if node is not None and stat.S_ISCHR(info.st_mode):
                held.add(node)
    except OSError as error:
        if error.errno in _GONE:
            return None
        raise _scan_error(pid, table, error) from error
    finally:
        os.close(directory)
    return held


def _mapped_nodes(pid: int, targets: NodeTargets, proc_root: Path) -> set[DeviceNode] | None:
    """Nodes mapped into the process: a mapping outlives the descriptor it was made with."""
    source = "maps"
    try:
        data = (proc_root / str(pid) / source).read_bytes()
        if not data:
            # No memory of its own: a kernel thread, or a leader that exited before its
            # threads, which share the process's memory and show it in their own maps.
            live = _live_threads(pid, proc_root)
            if live:
                source = f"task/{live[0]}/maps"
                data = (proc_root / str(pid) / source).read_bytes()
    except OSError as error:
        if error.errno in _GONE:
            return None
        raise _scan_error(pid, source, error) from error
    held: set[DeviceNode] = set()
    # Most processes map none of the node files: one substring test per node file tells.
    if not any(b" " + inode in data for inode in targets.mapped_inodes):
        return held
    for line in data.splitlines():
        # address perms offset major:minor inode [path]
        fields = line.split(maxsplit=5)
        if len(fields) < 5 or fields[4] not in targets.mapped_inodes:
            continue
        major, _, minor = fields[3].partition(b":")
        key = (os.makedev(int(major, 16), int(minor, 16)), int(fields[4]))
        if key in targets.by_file:
            held.add(targets.by_file[key])
    return held


def process_nodes(
    pid: int, targets: NodeTargets, proc_root: Path = Path("/proc"), census: Census | None = None
) -> frozenset[DeviceNode] | None:
    """The partition's nodes ``pid`` holds by descriptor or by mapping; None if it has exited.

    Raises ScanError when a live process cannot be read.
    """
    by_descriptor = _descriptor_nodes(pid, targets, proc_root, census)
    if by_descriptor is None:
        return None
    mapped = _mapped_nodes(pid, targets, proc_root)
    if mapped is None:
        return None
    return frozenset(by_descriptor | mapped)


def _parent(pid: int, proc_root: Path) -> int:
    fields = _stat_fields(pid, proc_root)
    return int(fields[1]) if len(fields) > 1 else 0


def ancestors(proc_root: Path = Path("/proc")) -> set[int]:
    found: set[int] = set()
    pid = _parent(os.getpid(), proc_root)
    while pid > 0 and pid not in found:
        found.add(pid)
        pid = _parent(pid, proc_root)
    return found


def _identity(pid: int, proc_root: Path) -> tuple[int, str]:
    """(real uid, command name) for messages; -1 and '?' if the process is gone."""
    uid, command = -1, "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in (proc_root / str(pid) / "status").read_text(errors="replace").splitlines():
            if line.startswith("Name:"):
                command = line.partition(":")[2].strip() or "?"
            elif line.startswith("Uid:"):
                uid = int(line.split()[1])
                break
    return uid, command


def take_census(
    targets: NodeTargets, proc_root: Path = Path("/proc"), use_kernel: bool = True
) -> Census:
    """Every process of the node that holds one of the nodes (blocking: run it in a thread).

    Asks the kernel first (agent/isolation/holder_iter.py: one pass in BPF, no process left
    unread), and reads /proc when the kernel cannot answer. Raises ScanError."""
    if use_kernel and proc_root == Path("/proc"):
        try:
            return _kernel_census(targets)
        except HolderIteratorError as error:
            global _fallback_logged  # noqa: PLW0603 - said once per process, not per release
            if not _fallback_logged:
                log.warning("holder_iterator_unavailable", reason=str(error), using="/proc")
                _fallback_logged = True
    return _proc_census(targets, proc_root)


_fallback_logged = False


def _kernel_census(targets: NodeTargets) -> Census:
    started = time.perf_counter()
    by_kernel_rdev = {kernel_rdev(rdev): node for rdev, node in targets.by_rdev.items()}
    canary = _canary(targets)
    try:
        held = holder_iter.holders(by_kernel_rdev, canary)
    finally:
        os.close(canary)
    census = Census(method="kernel")
    nodes: dict[int, set[DeviceNode]] = {}
    for record in held:
        if record.pid != os.getpid():
            nodes.setdefault(record.pid, set()).add(by_kernel_rdev[record.rdev])
    for pid, found in nodes.items():
        if is_alive(pid):
            uid, command = _identity(pid, Path("/proc"))
            census.holders[pid] = Holder(pid, uid, command, frozenset(found))
    census.seconds = time.perf_counter() - started
    return census


def _canary(targets: NodeTargets) -> int:
    """An O_PATH descriptor of the agent on one of the nodes, which the kernel census must
    report (it proves the census saw this very process); O_PATH neither opens the device nor
    passes the device cgroup."""
    for rdev, node in sorted(targets.by_rdev.items()):
        with contextlib.suppress(OSError):
            descriptor = os.open(node.path, os.O_PATH | os.O_CLOEXEC)
            if os.fstat(descriptor).st_rdev == rdev:
                return descriptor
            os.close(descriptor)
    raise HolderIteratorError("no node file to prove the census with")


def _proc_census(targets: NodeTargets, proc_root: Path) -> Census:
    started = time.perf_counter()
    census = Census(method="proc")
    own = os.getpid()
    supervisors = ancestors(proc_root)
    for name in os.listdir(proc_root):  # noqa: PTH208 - names only, no Path per process
        if not name.isdigit() or int(name) == own:
            continue
        pid = int(name)
        census.processes += 1
        try:
            nodes = process_nodes(pid, targets, proc_root, census)
        except ScanError as error:
            if pid not in supervisors:
                raise
            census.skipped.append(error)
            continue
        if nodes and is_alive(pid, proc_root):
            uid, command = _identity(pid, proc_root)
            census.holders[pid] = Holder(pid, uid, command, nodes)
    census.seconds = time.perf_counter() - started
    return census
