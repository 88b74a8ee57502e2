"""Eviction: after a fence is revoked, make sure no process still holds the partition.

An open file descriptor survives a cgroup device change, so revoking the fence is not enough
(DESIGN.md invariant 3). Holders are found three ways: processes with a file descriptor on one of
the partition's own device nodes (``/proc/*/fd`` by ``st_rdev``), the processes NVML reports on the
partition, and processes of the tenant's cgroup holding any NVIDIA node. They get SIGTERM, a grace
period, then SIGKILL (``cgroup.kill`` on cgroup v2; freeze and kill on v1), and the eviction only
succeeds once none of them is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent.errors import AccelguardError
from agent.hw.devnodes import DeviceNode
from agent.isolation.cgroups import cgroup_hierarchy, hierarchy_mounts, read_mounts

log = structlog.get_logger("accelguard.evict")

# The pids NVML reports on the partition (the driver's own view of who holds it).
NvmlHolders = Callable[[], Awaitable[set[int]]]


class EvictionError(AccelguardError):
    """Processes still hold a partition after SIGKILL: it must not be scrubbed or reused."""


@dataclass
class EvictionReport:
    terminated: list[int] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)
    outsiders: list[int] = field(default_factory=list)


def is_alive(pid: int, proc_root: Path = Path("/proc")) -> bool:
    """A zombie has released its file descriptors and its GPU context: it is not a holder."""
    try:
        data = (proc_root / str(pid) / "stat").read_bytes()
    except OSError:
        return False
    # The state follows the parenthesised command name, which may itself contain ')'.
    state = data[data.rfind(b")") + 2 : data.rfind(b")") + 3]
    return state not in (b"Z", b"X", b"")


def fd_holders(rdevs: set[int], proc_root: Path = Path("/proc")) -> set[int]:
    """Pids with an open file descriptor on a character device whose st_rdev is in ``rdevs``."""
    holders: set[int] = set()
    own = os.getpid()
    try:
        entries = list(os.scandir(proc_root))
    except OSError:
        return holders
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        try:
            descriptors = os.scandir(Path(entry.path) / "fd")
        except OSError:
            continue  # exited, or a kernel thread
        with descriptors:
            for descriptor in descriptors:
                try:
                    info = os.stat(descriptor.path)  # noqa: PTH116 - follows the fd's link
                except OSError:
                    continue
                if stat.S_ISCHR(info.st_mode) and info.st_rdev in rdevs:
                    holders.add(int(entry.name))
                    break
    return holders


def cgroup_pids(cgroup: Path) -> set[int]:
    try:
        text = (cgroup / "cgroup.procs").read_text()
    except OSError:
        return set()
    return {int(line) for line in text.split() if line.isdigit()}


def _kill(pids: Iterable[int], signum: int) -> list[int]:
    sent = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
            sent.append(pid)
    return sent


def _freezer_twin(cgroup: Path) -> Path | None:
    """The cgroup v1 freezer cgroup at the same relative path as a v1 devices cgroup, if any."""
    mounts = read_mounts()
    freezers = [
        m.mount_point for m in mounts if m.fs_type == "cgroup" and "freezer" in m.super_options
    ]
    for devices in hierarchy_mounts("v1-devices", mounts):
        try:
            relative = cgroup.relative_to(devices)
        except ValueError:
            continue
        for freezer in freezers:
            twin = freezer / relative
            if (twin / "freezer.state").exists():
                return twin
    return None


def kill_cgroup(cgroup: Path, pids: set[int]) -> list[int]:
    """SIGKILL everything in the tenant's cgroup, without letting it fork away first."""
    if cgroup_hierarchy(cgroup) == "v2" and (cgroup / "cgroup.kill").exists():
        # cgroup.kill (Linux 5.14) kills every process of the cgroup atomically, forks included.
        (cgroup / "cgroup.kill").write_text("1")
        return sorted(pids)
    freezer = _freezer_twin(cgroup)
    if freezer is not None:
        (freezer / "freezer.state").write_text("FROZEN")
        try:
            killed = _kill(cgroup_pids(cgroup) | pids, signal.SIGKILL)
        finally:
            (freezer / "freezer.state").write_text("THAWED")
        return killed
    # No freezer: kill repeatedly until the cgroup stays empty (a fork may race one round).
    swept: list[int] = []
    for _ in range(10):
        round_pids = cgroup_pids(cgroup) | {p for p in pids if is_alive(p)}
        if not round_pids:
            break
        swept += _kill(round_pids, signal.SIGKILL)
    return swept


class Evictor:
    def __init__(
        self,
        grace_s: float,
        proc_root: Path = Path("/proc"),
        poll_s: float = 0.05,
    ) -> None:
        self._grace_s = grace_s
        self._proc_root = proc_root
        self._poll_s = poll_s

    async def holders(
        self,
        own_nodes: Iterable[DeviceNode],
        any_nodes: Iterable[DeviceNode],
        cgroup: Path | None,
        nvml_holders: NvmlHolders,
    ) -> tuple[set[int], set[int]]:
        """(pids in the tenant's cgroup, pids outside it) that hold the partition."""
        own = {os.makedev(n.major, n.minor) for n in own_nodes}
        shared = {os.makedev(n.major, n.minor) for n in any_nodes}
        members = cgroup_pids(cgroup) if cgroup is not None else set()
        holding = fd_holders(own, self._proc_root) | await nvml_holders()
        holding |= members & fd_holders(shared, self._proc_root)
        holding = {p for p in holding if is_alive(p, self._proc_root)}
        return holding & members, holding - members

    async def evict(
        self,
        own_nodes: list[DeviceNode],
        any_nodes: list[DeviceNode],
        cgroup: Path | None,
        kill_whole_cgroup: bool,
        nvml_holders: NvmlHolders,
    ) -> EvictionReport:
        report = EvictionReport()

        async def current() -> tuple[set[int], set[int]]:
            inside, outside = await self.holders(own_nodes, any_nodes, cgroup, nvml_holders)
            for pid in sorted(outside - set(report.outsiders)):
                # Not the tenant's process, yet it holds the partition: evicted all the same.
                log.warning("evicting_outsider", pid=pid, cgroup=str(cgroup))
                report.outsiders.append(pid)
            return inside, outside

        inside, outside = await current()
        if not inside and not outside:
            return report
        report.terminated = _kill(inside | outside, signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + self._grace_s
        while asyncio.get_running_loop().time() < deadline:
            inside, outside = await current()
            if not inside and not outside:
                return report
            await asyncio.sleep(self._poll_s)
        if inside and cgroup is not None and kill_whole_cgroup:
            report.killed += kill_cgroup(cgroup, inside)
        else:
            report.killed += _kill(inside, signal.SIGKILL)
        report.killed += _kill(outside, signal.SIGKILL)
        # SIGKILL is not instant (a process in uninterruptible sleep in the driver finishes its
        # call first): wait, bounded, for the holders to be gone.
        for _ in range(200):
            inside, outside = await current()
            if not inside and not outside:
                return report
            await asyncio.sleep(self._poll_s)
        raise EvictionError(
            f"processes {sorted(inside | outside)} still hold the partition after SIGKILL"
        )
