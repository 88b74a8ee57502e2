"""The journal is not the truth (DESIGN.md invariant 6): the hardware and the kernel are.

After every inventory refresh and at start-up, the reconciler compares what the journal believes
with what NVML and the kernel's fences say, and turns every disagreement into the safe outcome: a
lease whose partition vanished or changed identity is lost (journaled, fence revoked, holders
evicted, partition quarantined); a fence that drifted is re-applied; a fence of ours that no live
lease explains is revoked; a fence nobody explains is reported and the partitions it opens are
quarantined; a journal younger than the node quarantines everything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Protocol

import structlog

from agent.errors import AccelguardError, IsolationError
from agent.hw.devnodes import DeviceNode
from agent.isolation import cdi, fence_for
from agent.isolation.driver_files import host_search
from agent.isolation.protocol import fenced_rules
from agent.isolation.rules import DeviceRule
from agent.isolation.survey import SurveyedFence, related, survey_fences
from agent.partitions.context import PartitionContext
from agent.partitions.fencing import FENCED, TenantFences
from agent.partitions.revocation import Revoker
from agent.partitions.sanitize import Sanitizer
from agent.runtime import failpoints
from agent.runtime.failpoints import CrashPoint
from agent.store import LeaseRecord, LeaseState, PartitionRecord, PartitionState, SyncResult

log = structlog.get_logger(__name__)


JOURNAL_LOST_REASON = (
    "journal lost or replaced (the node's key is older than its journal): nobody can vouch for "
    "this partition's memory or holders; clear it to scrub"
)


class LeaseControl(Protocol):
    """What the reconciler needs from the lease manager."""

    ready: asyncio.Event

    async def retire(self, lease_id: str, reason: str) -> PartitionRecord: ...

    async def release(self, lease_id: str, reason: str = ...) -> PartitionRecord: ...

    def spawn(self, work: Coroutine[Any, Any, object], name: str) -> None: ...

    def wake(self) -> None: ...


class Reconciler:
    def __init__(
        self,
        context: PartitionContext,
        fences: TenantFences,
        revoker: Revoker,
        sanitizer: Sanitizer,
        leases: LeaseControl,
    ) -> None:
        self._ctx = context
        self._fences = fences
        self._revoker = revoker
        self._sanitizer = sanitizer
        self._leases = leases
        # Set at start-up when the journal is younger than the node's identity (lost, emptied).
        self.journal_lost = False

    async def on_inventory_sync(self, result: SyncResult) -> None:
        """Called by the inventory after every refresh, before anyone reads the new snapshot.

        A live lease whose partition vanished or changed identity is lost: journaled and
        quarantined here, at once (a status right after shows it); the fence revocation and
        the eviction run as their own task.
        """
        gone = set(result.vanished) | set(result.changed)
        if not gone:
            return
        for lease in await self._ctx.leases(live_only=True):
            if lease.partition_uuid in gone:
                why = (
                    "the partition vanished from the hardware"
                    if lease.partition_uuid in result.vanished
                    else "the partition changed identity (GPU UUID, MIG mode, GI/CI or placement)"
                )
                self._leases.spawn(self.lose(lease, why), f"lose {lease.id}")
        for uuid in result.vanished:
            log.warning("partition_vanished", partition=uuid)
        for uuid in result.changed:
            log.warning("partition_changed", partition=uuid)
        self._leases.wake()

    async def lose(self, lease: LeaseRecord, why: str) -> None:
        """The partition under a live lease vanished or changed identity (invariant 6).

        Journaled first (lease ``lost``, partition quarantined), then every fence of ours that
        allowed its nodes is recomputed without them, and its holders are evicted.
        """
        with structlog.contextvars.bound_contextvars(
            lease=lease.id, partition=lease.partition_uuid, tenant=lease.tenant
        ):
            await self._lose(lease, why)

    async def _lose(self, lease: LeaseRecord, why: str) -> None:
        reason = f"lost while leased to {lease.tenant} ({lease.id}): {why}"
        if not await self._ctx.executor.call(self._ctx.store.lose_lease, lease.id, reason):
            return  # ended meanwhile
        await self._ctx.report_lease(lease.id)
        await self._ctx.report_partition(lease.partition_uuid)
        log.error(
            "lease_lost", lease=lease.id, partition=lease.partition_uuid, tenant=lease.tenant,
            cgroup=lease.cgroup, reason=why,
        )  # fmt: skip
        failpoints.hit(CrashPoint.RECONCILE_LOST_AFTER_JOURNAL)
        nodes = [
            DeviceNode(Path(path), major, minor, kind)
            for kind, major, minor, path in await self._fences.lease_nodes(lease)
        ]
        if nodes:
            self._ctx.lost_nodes[lease.partition_uuid] = nodes
        try:
            await self._fences.fence_cgroup(lease.cgroup)
            failpoints.hit(CrashPoint.RECONCILE_LOST_AFTER_REVOKE)
            await self._ctx.executor.call(
                cdi.remove_spec, self._ctx.config.leases.cdi_dir, lease.id
            )
            record = await self._ctx.stored(lease.partition_uuid)
            if nodes:
                async with self._ctx.locks[lease.partition_uuid]:
                    await self._revoker.evict(record, lease)
        except AccelguardError as error:
            log.error("lost_lease_cleanup_failed", lease=lease.id, error=str(error))  # noqa: TRY400
        finally:
            self._ctx.lost_nodes.pop(lease.partition_uuid, None)

    async def audit_fences(self) -> None:
        """Read every fence back from the kernel and make it what the journal says.

        A cgroup with live leases whose fence drifted, or that has no fence at all (a program
        detached behind the agent's back), is re-fenced (a failure there releases the lease:
        fail closed). A fence of ours on a cgroup whose leases all ended is revoked to
        the baseline. A fence nobody in the journal explains (a lost journal, another manager)
        is reported, left in place (it only restricts), and every partition whose own nodes it
        allows is quarantined: it is not handed out while a stranger can open it.
        """
        parents = list(self._ctx.config.tenants.cgroup_parents)
        fences, problems = await asyncio.to_thread(survey_fences, parents)
        for problem in problems:
            log.error("fence_unreadable", cgroup=problem.cgroup, error=problem.error)
        live = await self._ctx.leases(live_only=True)
        # Unbound leases (bind_later) have no cgroup, hence no fence to explain.
        history = {lease.cgroup for lease in await self._ctx.leases() if lease.cgroup}
        leased = {lease.cgroup for lease in live if lease.state in FENCED and lease.cgroup}
        self._fences.fences = {fence.cgroup: fence for fence in fences}
        partitions = [p for p in await self._ctx.partitions() if p.present]
        for fence in fences:
            if any(related(cgroup, fence.cgroup) for cgroup in leased):
                if fence.cgroup in leased:
                    await self._check_drift(fence, live)
                continue  # a descendant of a leased cgroup inherits (v1) its fence
            if fence.cgroup in history:
                # Ours, and none of its leases is live any more (lost, or a crash between
                # journal and revoke): nothing beyond the baseline may remain.
                if fence.state.allowed is None or tuple(fence.state.allowed) != fenced_rules(()):
                    log.warning("stale_fence_revoked", cgroup=fence.cgroup)
                    await self._fences.fence_cgroup(fence.cgroup)
                continue
            allows = self._fences.partitions_allowed(fence, partitions)
            for record in allows:
                if record.state == PartitionState.QUARANTINED:
                    continue
                if record.state != PartitionState.FREE:
                    continue  # leased, releasing or scrubbing: its own path ends it safely
                reason = f"the fence on {fence.cgroup} allows its nodes and no lease explains it"
                await self._sanitizer.quarantine(record.uuid, reason)
                failpoints.hit(CrashPoint.RECONCILE_ORPHAN_AFTER_QUARANTINE)
            if allows:
                log.error(
                    "unexplained_fence", cgroup=fence.cgroup, mechanism=fence.state.mechanism,
                    partitions=[r.uuid for r in allows],
                )  # fmt: skip
        surveyed = {fence.cgroup for fence in fences}
        active = {lease.cgroup for lease in live if lease.state == LeaseState.ACTIVE}
        for cgroup in sorted(active - surveyed - {""}):
            await self._restore_missing(cgroup, live)

    async def _restore_missing(self, cgroup: str, live: list[LeaseRecord]) -> None:
        """An active lease's cgroup the survey found no fence of ours on: re-fenced, unless it is
        gone (its processes with it; a cgroup made again at its path is fenced next time) or a
        fence appeared since the survey (a grant's own)."""
        path = Path(cgroup)

        def missing() -> bool:
            try:
                return path.is_dir() and fence_for(path).current(path) is None
            except AccelguardError:
                return True  # unreadable: not known to be in place

        if not await asyncio.to_thread(missing):
            return
        log.warning("fence_missing_restored", cgroup=cgroup)
        await self._refence(cgroup, live, "fence missing")

    async def _check_drift(self, fence: SurveyedFence, live: list[LeaseRecord]) -> None:
        expected = [
            DeviceRule(kind, major, minor, frozenset("rw"))  # type: ignore[arg-type]
            for lease in live
            if lease.cgroup == fence.cgroup and lease.state in FENCED
            for kind, major, minor, _path in await self._fences.lease_nodes(lease)
        ]
        try:
            wanted = fenced_rules(expected)
        except AccelguardError:
            return
        if fence.state.allowed is not None and tuple(fence.state.allowed) == tuple(wanted):
            return
        found = None if fence.state.allowed is None else [str(r) for r in fence.state.allowed]
        log.warning("fence_drift_corrected", cgroup=fence.cgroup, found=found)
        await self._refence(fence.cgroup, live, "fence drifted")

    async def _refence(self, cgroup: str, live: list[LeaseRecord], what: str) -> None:
        try:
            await self._fences.fence_cgroup(cgroup)
        except AccelguardError as error:
            for lease in live:
                if lease.cgroup == cgroup:
                    self._leases.spawn(
                        self._leases.release(
                            lease.id, f"{what} and could not be re-applied: {error}"
                        ),
                        f"release {lease.id}",
                    )

    async def _forget_journal(self) -> None:
        """The journal is younger than the node: quarantine everything present."""
        for record in await self._ctx.partitions():
            if record.state != PartitionState.QUARANTINED:
                await self._sanitizer.quarantine(record.uuid, JOURNAL_LOST_REASON)

    async def _sweep_specs(self) -> None:
        """Remove CDI specs of leases that are not live (a lost journal's, a half-written one):
        a container runtime must not be offered a device no lease stands behind."""
        live = [lease.id for lease in await self._ctx.leases(live_only=True)]
        try:
            removed = await self._ctx.executor.call(
                cdi.sweep_specs, self._ctx.config.leases.cdi_dir, live
            )
        except IsolationError as error:
            log.error("cdi_sweep_failed", error=str(error))  # noqa: TRY400 - one line
            return
        for name in removed:
            log.warning("cdi_spec_swept", spec=name, reason="its lease is not live")

    async def at_start_up(self) -> None:
        """Start-up: finish or undo whatever a crash interrupted, toward safety."""
        if self.journal_lost:
            log.error("journal_lost", reason=JOURNAL_LOST_REASON)
            await self._forget_journal()
        for lease in await self._ctx.leases(live_only=True):
            record = await self._ctx.executor.call(self._ctx.store.partition, lease.partition_uuid)
            if lease.state in ("granting", "releasing"):
                reason = (
                    "recovered after restart" if lease.state == "granting" else lease.release_reason
                )
                async with self._ctx.locks[lease.partition_uuid]:
                    await self._leases.retire(lease.id, reason or "recovered after restart")
            elif record is None or not record.present:
                await self.lose(lease, "the partition vanished while the agent was down")
            elif lease.cgroup and not Path(lease.cgroup).is_dir():
                async with self._ctx.locks[lease.partition_uuid]:
                    await self._leases.retire(lease.id, "the tenant cgroup disappeared")
            else:
                try:
                    await self._fences.fence_cgroup(
                        lease.cgroup
                    )  # the fence survives; re-assert it
                    nodes = self._ctx.nodes(record)
                    await self._ctx.executor.call(
                        cdi.write_spec, self._ctx.config.leases.cdi_dir, lease.id, nodes,
                        record.uuid, host_search(self._ctx.config.nvml.library),
                    )  # fmt: skip
                except IsolationError as error:
                    async with self._ctx.locks[lease.partition_uuid]:
                        await self._leases.retire(
                            lease.id, f"fence could not be re-applied: {error}"
                        )
        for record in await self._ctx.partitions():
            if record.state in ("releasing", "scrubbing", "leased") and record.lease_id is None:
                # Half-done and no live lease owns it: unknown means dirty.
                await self._ctx.executor.call(
                    self._ctx.store.transition, record.uuid, (record.state,), PartitionState.FREE,
                    clean=False,
                )  # fmt: skip
        await self._sweep_specs()
        await self.audit_fences()
        self._leases.ready.set()
        self._leases.wake()
