"""Eviction: after a fence is revoked, make sure no process still holds the partition.

An open file descriptor survives a cgroup device change, so revoking the fence is not enough
(DESIGN.md invariant 3). Who is evicted, who is left alone, and when an eviction fails:

- a process of the tenant's cgroup that holds any of the partition's nodes (an open descriptor
  whose ``st_rdev`` is the node's, or a memory map of the node file) or that NVML lists on the
  partition gets SIGTERM, the grace period, then SIGKILL (``cgroup.kill`` on cgroup v2, freeze and
  kill on v1). One that cannot be read is evicted all the same: it is the revoked tenant's;
- a process outside the cgroup that NVML lists on the partition is evicted the same way
  (``evicting_outsider``): the driver says it runs there;
- a process outside the cgroup that only holds shared nodes (``nvidiactl``, the UVM nodes, the
  parent ``/dev/nvidiaN``, also for a whole GPU) is logged (``shared_node_holder``) and left alone:
  nvidia-persistenced, DCGM and dcgm-exporter hold those on every GPU node;
- a process outside the cgroup that holds one of the partition's MIG capability nodes and that
  NVML does not list is not signalled either (we cannot tell what it is), and the eviction fails:
  the partition is quarantined rather than declared free;
- a process that cannot be read (EACCES without CAP_SYS_PTRACE, any error but its own exit) fails
  the eviction: a scan that skipped a process proves nothing.

Reading one process's holdings from /proc costs one ``stat`` per descriptor, and a busy node has
10^5-10^6 descriptors. So the polls during the grace period look only at the cgroup's members,
the pids NVML lists and the pids already found; one census of every process
(agent/isolation/census.py: asked of the kernel in one BPF pass where it can, /proc otherwise)
runs after they are gone (no process of the tenant is left to pass a descriptor to an outsider
behind it), and again only if it finds someone to evict. Every scan runs in a thread of its own,
never on the event loop nor on the daemon's single blocking executor (journal and NVML keep
answering).

The agent's ancestors (its supervisor: systemd, or a test runner) are scanned too, but one that
cannot be read is logged (``scan_skipped_ancestor``), not a failure: a supervisor can replace or
trace the agent at will, so no eviction protects against it, and a sandbox's supervisor may be
unreadable even to root.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent.errors import EvictionError, ScanError
from agent.hw.devnodes import DeviceNode
from agent.isolation.census import Census, NodeTargets, is_alive, process_nodes, take_census
from agent.isolation.cgroups import cgroup_hierarchy, hierarchy_mounts, read_mounts

log = structlog.get_logger(__name__)

# The pids NVML reports on the partition (the driver's own view of who holds it).
NvmlHolders = Callable[[], Awaitable[set[int]]]

# A census that finds new holders drives them out and counts again; a node where holders keep
# appearing faster than that is not one to hand to the next tenant.
CENSUS_ROUNDS = 3


@dataclass
class EvictionReport:
    terminated: list[int] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)
    outsiders: list[int] = field(default_factory=list)
    shared_holders: list[int] = field(default_factory=list)


def cgroup_pids(cgroup: Path) -> set[int]:
    try:
        text = (cgroup / "cgroup.procs").read_text()
    except OSError:
        return set()
    return {int(line) for line in text.split() if line.isdigit()}


def _kill(pids: Iterable[int], signum: int) -> list[int]:
    sent = []
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            continue
        except PermissionError as error:
            # Missing CAP_KILL, or a seccomp filter: the holder stays, so the release fails
            # closed (quarantine) with the reason instead of an internal error.
            raise EvictionError(
                f"cannot signal pid {pid} ({signal.Signals(signum).name}): {error.strerror}"
            ) from error
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
    try:
        return _kill_cgroup(cgroup, pids)
    except OSError as error:
        # A read-only cgroup tree (ProtectControlGroups=), a missing capability: fail closed.
        raise EvictionError(f"cannot kill the processes of {cgroup}: {error}") from error


def _kill_cgroup(cgroup: Path, pids: set[int]) -> list[int]:
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


def _tenant_holds(nodes: frozenset[DeviceNode], targets: NodeTargets, sole_lease: bool) -> bool:
    """Whether a process of the tenant's cgroup holds the partition being released.

    While the cgroup holds another live lease, its processes need the shared nodes (nvidiactl,
    UVM, maybe the same /dev/nvidiaN) for that lease: only this partition's own nodes count then.
    """
    return bool(nodes if sole_lease else nodes & targets.own)


def _node_names(nodes: Iterable[DeviceNode]) -> str:
    return ", ".join(sorted(str(n.path) for n in nodes))


class Evictor:
    def __init__(
        self,
        grace_s: float,
        proc_root: Path = Path("/proc"),
        poll_s: float = 0.05,
        census: str = "auto",
    ) -> None:
        self._grace_s = grace_s
        self._use_kernel = census == "auto"
        self._proc_root = proc_root
        self._poll_s = poll_s

    def _survey(
        self,
        targets: NodeTargets,
        cgroup: Path | None,
        sole_lease: bool,
        listed: set[int],
        watched: set[int],
    ) -> tuple[set[int], set[int]]:
        """(pids in the tenant's cgroup, pids outside it) that hold the partition, looking only
        at the cgroup's members, the pids NVML lists and the pids found before (blocking)."""
        members = cgroup_pids(cgroup) if cgroup is not None else set()
        inside: set[int] = set()
        outside: set[int] = set()
        own = os.getpid()
        for pid in members | listed | watched:
            if pid == own or not is_alive(pid, self._proc_root):
                continue
            if pid in listed:
                (inside if pid in members else outside).add(pid)
                continue
            try:
                nodes = process_nodes(pid, targets, self._proc_root)
            except ScanError:
                # Unreadable, yet the tenant's or found holding before: evicted, not trusted.
                nodes = targets.every
            if nodes is None:
                continue
            if pid in members and _tenant_holds(nodes, targets, sole_lease):
                inside.add(pid)
            elif pid not in members and nodes & targets.own:
                outside.add(pid)
        return inside, outside

    async def evict(
        self,
        own_nodes: list[DeviceNode],
        any_nodes: list[DeviceNode],
        cgroup: Path | None,
        kill_whole_cgroup: bool,
        nvml_holders: NvmlHolders,
    ) -> EvictionReport:
        report = EvictionReport()
        targets = await asyncio.to_thread(NodeTargets.of, own_nodes, any_nodes)
        watched: set[int] = set()
        for _ in range(CENSUS_ROUNDS):
            await self._drive_out(targets, cgroup, kill_whole_cgroup, nvml_holders, report, watched)
            census = await asyncio.to_thread(
                take_census, targets, self._proc_root, self._use_kernel
            )
            log.info(
                "holder_census", method=census.method, processes=census.processes,
                descriptors=census.descriptors, holders=sorted(census.holders),
                seconds=round(census.seconds, 3),
            )  # fmt: skip
            for skipped in census.skipped:
                log.warning("scan_skipped_ancestor", pid=skipped.pid, error=skipped.detail)
            members = await asyncio.to_thread(cgroup_pids, cgroup) if cgroup is not None else set()
            listed = await nvml_holders()
            late = {
                pid
                for pid, holder in census.holders.items()
                if pid in listed
                or (pid in members and _tenant_holds(holder.nodes, targets, kill_whole_cgroup))
            }
            late |= {p for p in listed if is_alive(p, self._proc_root)}
            if not late:
                break
            # New holders since the polls (a process moved into the cgroup, a new CUDA context):
            # drive them out too, then count again.
            watched |= late
        else:
            raise EvictionError(
                f"processes {sorted(late)} kept appearing on the partition through "
                f"{CENSUS_ROUNDS} evictions"
            )
        self._judge_remaining(census, targets, report)
        return report

    def _judge_remaining(
        self, census: Census, targets: NodeTargets, report: EvictionReport
    ) -> None:
        """The holders left once every process to evict is gone: node services on shared
        nodes are logged; anyone on a capability node fails the eviction."""
        unknown: list[str] = []
        for holder in sorted(census.holders.values(), key=lambda h: h.pid):
            exclusive = holder.nodes & targets.exclusive
            if exclusive:
                unknown.append(
                    f"pid {holder.pid} (uid {holder.uid}, {holder.command}) holds "
                    f"{_node_names(exclusive)}"
                )
                continue
            log.info(
                "shared_node_holder", pid=holder.pid, uid=holder.uid, command=holder.command,
                nodes=sorted(str(n.path) for n in holder.nodes),
            )  # fmt: skip
            report.shared_holders.append(holder.pid)
        if unknown:
            raise EvictionError(
                f"{'; '.join(unknown)}: outside the tenant's cgroup and not listed by NVML on "
                "the partition, so not killed; the partition stays out of service until an "
                "operator finds out why"
            )

    async def _drive_out(
        self,
        targets: NodeTargets,
        cgroup: Path | None,
        kill_whole_cgroup: bool,
        nvml_holders: NvmlHolders,
        report: EvictionReport,
        watched: set[int],
    ) -> None:
        """SIGTERM, grace, SIGKILL for the tenant's holders and the outsiders NVML lists."""

        async def current() -> tuple[set[int], set[int]]:
            listed = await nvml_holders()
            inside, outside = await asyncio.to_thread(
                self._survey, targets, cgroup, kill_whole_cgroup, listed, set(watched)
            )
            for pid in sorted(outside - set(report.outsiders)):
                # Not the tenant's process, yet the driver says it runs on the partition.
                log.warning("evicting_outsider", pid=pid, cgroup=str(cgroup))
                report.outsiders.append(pid)
            watched.update(inside | outside)
            return inside, outside

        inside, outside = await current()
        if not inside and not outside:
            return
        report.terminated += _kill(inside | outside, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._grace_s
        while loop.time() < deadline:
            inside, outside = await current()
            if not inside and not outside:
                return
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
                return
            await asyncio.sleep(self._poll_s)
        raise EvictionError(
            f"processes {sorted(inside | outside)} still hold the partition after SIGKILL"
        )
