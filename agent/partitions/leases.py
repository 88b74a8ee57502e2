"""The lease state machine: a partition goes to one tenant and comes back clean.

States: ``free(clean)`` -> ``leased`` -> ``releasing`` (fence revoked, evicting) -> ``scrubbing``
-> ``free(clean)``; any failure -> ``quarantined(reason)``, left only by an operator's ``clear``
(which scrubs again) or a later successful scrub. The invariants (DESIGN.md):

1. a partition is granted only if clean (``Store.begin_grant`` checks it atomically);
2. clean becomes true only through a verified scrub that started after the last holder was gone
   (the scrub runs after eviction succeeded, and only its verified result sets ``clean``);
3. a revoked tenant can open none of the partition's nodes and no process of it holds one
   (fence revoke, then eviction, before the scrub);
4. every transition is journaled before it is acted on; at start-up anything half-done is
   driven to safety: revoke, evict, scrub; a partition the journal did not know is dirty;
5. a MIG instance is scrubbed before it is destroyed (``pinned`` feeds the layout planner).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any

import structlog

from agent.config import Config
from agent.errors import (
    AccelguardError,
    NotFoundError,
    RetryLaterError,
    StoreError,
    ValidationError,
)
from agent.hw.model import AcceleratorBackend
from agent.identity.node_key import NodeKey
from agent.isolation import cdi
from agent.isolation.evict import Evictor
from agent.partitions import binding
from agent.partitions.context import NoEvents, PartitionContext, PartitionEvents
from agent.partitions.faults import HealthFaults
from agent.partitions.fencing import TenantFences
from agent.partitions.granting import Granter
from agent.partitions.inventory import InventoryService
from agent.partitions.reconcile import Reconciler
from agent.partitions.revocation import Revoker
from agent.partitions.sanitize import Sanitizer
from agent.runtime import failpoints
from agent.runtime.executor import BlockingExecutor
from agent.runtime.failpoints import CrashPoint
from agent.scrub.runner import ScrubRunner
from agent.store import (
    LeaseRecord,
    LeaseState,
    PartitionRecord,
    PartitionState,
    Store,
    SyncResult,
)
from agent.store.health import HealthLog

log = structlog.get_logger(__name__)
# A release that failed transiently (a full disk, a fence write refused) is retried by the agent
# on its own at this pace until it completes or quarantines.
RELEASE_RETRY_S = 2.0


class LeaseManager:
    """Orchestrates grant and release over the parts: fencing (the tenant's cgroup), revocation
    (fence off, then eviction), sanitising (scrub, certificate, quarantine) and reconciliation
    (hardware and kernel against the journal). Its scheduler (``run``) never awaits slow work."""

    def __init__(
        self,
        config: Config,
        store: Store,
        executor: BlockingExecutor,
        inventory: InventoryService,
        backend: AcceleratorBackend,
        scrubber: ScrubRunner,
        evictor: Evictor,
        node_key: NodeKey,
        events: PartitionEvents | None = None,
    ) -> None:
        self._ctx = PartitionContext(
            config, store, executor, inventory, backend, events=events or NoEvents()
        )
        self._fences = TenantFences(self._ctx)
        self._revoker = Revoker(self._ctx, evictor)
        self._sanitizer = Sanitizer(self._ctx, scrubber, node_key)
        self._reconciler = Reconciler(self._ctx, self._fences, self._revoker, self._sanitizer, self)
        # What GPU health faults do to partitions (the health monitor's FaultSink).
        self.faults = HealthFaults(self._ctx, self._reconciler, self._sanitizer, self)
        self._health = HealthLog(store)
        self._wake = asyncio.Event()
        self._sanitizing: set[str] = set()
        # Release tasks by lease id: a second `lease release` (or the expiry, or the retry loop)
        # joins the one running instead of starting another.
        self._releases: dict[str, asyncio.Task[PartitionRecord]] = {}
        # Releases asked for and not finished (a transient failure, even before the journal
        # said "releasing"): the service loop retries each until it completes or quarantines.
        self._wanted: dict[str, str] = {}
        self._tasks: set[asyncio.Task[object]] = set()
        self.ready = asyncio.Event()
        self._granter = Granter(self._ctx, self._fences, self.retire, self.ready)
        # A free, clean partition to a tenant (agent/partitions/granting.py).
        self.grant = self._granter.grant

    @property
    def journal_lost(self) -> bool:
        return self._reconciler.journal_lost

    @journal_lost.setter
    def journal_lost(self, value: bool) -> None:
        self._reconciler.journal_lost = value

    # -- queries ----------------------------------------------------------------------------------

    async def partitions(self) -> list[PartitionRecord]:
        return await self._ctx.partitions()

    async def leases(self, live_only: bool = False) -> list[LeaseRecord]:
        return await self._ctx.leases(live_only)

    async def certificates(self, partition_uuid: str = "") -> list[dict[str, object]]:
        return await self._sanitizer.certificates(partition_uuid)

    async def on_inventory_sync(self, result: SyncResult) -> None:
        await self._reconciler.on_inventory_sync(result)

    async def pinned(self, *, dirty_too: bool, scrubbing_too: bool = True) -> dict[str, set[int]]:
        """GPU UUID -> GI ids the layout must not destroy: held, releasing, quarantined, and
        (as asked) being scrubbed or not yet clean (invariant 5)."""
        result: dict[str, set[int]] = defaultdict(set)
        for record in await self.partitions():
            if record.kind not in ("mig", "vnpu") or record.gi_id is None:
                continue
            waitable = record.state == "scrubbing" and not scrubbing_too
            if (record.state != "free" and not waitable) or (dirty_too and not record.clean):
                result[record.gpu_uuid].add(record.gi_id)
        return dict(result)

    async def bind(self, lease_id: str, cgroup: str) -> LeaseRecord:
        """Fence a ``bind_later`` lease's cgroup once it exists (agent/partitions/binding.py)."""
        async with self._granter.lock:
            return await binding.bind(self._ctx, self._fences, self.retire, lease_id, cgroup)

    async def release(self, lease_id: str, reason: str = "released") -> PartitionRecord:
        """Revoke, evict, scrub; returns the partition as the release left it.

        Idempotent: releasing a released (or lost) lease answers its recorded outcome, and a
        release already running is joined, not repeated. A step that fails transiently leaves
        the lease ``releasing``; the agent retries it on its own (RetryLaterError meanwhile).
        """
        lease = await self._ctx.executor.call(self._ctx.store.lease, lease_id)
        if lease is None:
            raise NotFoundError(f"lease {lease_id} does not exist")
        try:
            if not lease.live and not lease.outcome:  # its scrub was cut short: finish it
                async with self._ctx.locks[lease.partition_uuid]:
                    resumed = await self._sanitizer.resume(lease.partition_uuid, lease_id)
                    if resumed is not None:
                        return await self._record_outcome(lease_id, resumed)
                lease = await self._ctx.executor.call(self._ctx.store.lease, lease_id) or lease
            if not lease.live:
                return await self._recorded_outcome(lease)
            return await asyncio.shield(
                self._releases.get(lease_id) or self._start_release(lease_id, reason)
            )
        except StoreError as error:
            raise RetryLaterError(
                f"release of {lease_id} was interrupted ({error}); the agent retries it on its "
                f"own: run `accelguard lease release {lease_id}` again to wait for the outcome"
            ) from error

    def _start_release(self, lease_id: str, reason: str) -> asyncio.Task[PartitionRecord]:
        task = asyncio.create_task(self._release_once(lease_id, reason), name=f"release {lease_id}")
        self._releases[lease_id] = task
        self._wanted[lease_id] = reason

        def done(finished: asyncio.Task[PartitionRecord]) -> None:
            if self._releases.get(lease_id) is finished:
                del self._releases[lease_id]
            if finished.cancelled():
                return
            error = finished.exception()
            if error is None:
                self._wanted.pop(lease_id, None)
                return
            log.error("lease_release_interrupted", lease=lease_id, error=str(error))
            if isinstance(error, AccelguardError) and not isinstance(error, StoreError):
                self._wanted.pop(lease_id, None)  # refused for good (e.g. not found): no retry

        task.add_done_callback(done)
        return task

    async def _release_once(self, lease_id: str, reason: str) -> PartitionRecord:
        lease = await self._ctx.executor.call(self._ctx.store.lease, lease_id)
        if lease is None:  # pragma: no cover - callers checked
            raise NotFoundError(f"lease {lease_id} does not exist")
        # Every log line of this release (eviction, scrub, certificate) carries who and what.
        structlog.contextvars.bind_contextvars(
            lease=lease.id, partition=lease.partition_uuid, tenant=lease.tenant
        )
        async with self._ctx.locks[lease.partition_uuid]:
            # Another path (a lost partition, a crash recovery) may have ended it meanwhile.
            current = await self._ctx.executor.call(self._ctx.store.lease, lease_id)
            if current is None or not current.live:
                return await self._recorded_outcome(current or lease)
            return await self.retire(lease_id, current.release_reason or reason)

    async def _recorded_outcome(self, lease: LeaseRecord) -> PartitionRecord:
        """The partition as this lease's release left it (it may have moved on since)."""
        record = await self._ctx.stored(lease.partition_uuid)
        outcome = lease.outcome
        if outcome in ("clean", "not granted"):
            return replace(record, state=PartitionState.FREE, clean=True, reason="", lease_id=None)
        if outcome:
            state, _, why = outcome.partition(": ")
            return replace(
                record, state=PartitionState.QUARANTINED, clean=False,
                reason=f"{state}: {why}" if state == "lost" else why, lease_id=None,
            )  # fmt: skip
        return record

    async def retire(self, lease_id: str, reason: str) -> PartitionRecord:
        """Revoke, evict, scrub. Caller holds the partition lock. Idempotent after a crash."""
        lease = await self._ctx.executor.call(self._ctx.store.lease, lease_id)
        if lease is None:  # pragma: no cover - callers checked
            raise NotFoundError(f"lease {lease_id} does not exist")
        await self._ctx.executor.call(self._ctx.store.begin_release, lease_id, reason)
        await self._ctx.report_lease(lease_id)
        log.info("lease_releasing", lease=lease_id, partition=lease.partition_uuid, reason=reason)
        failpoints.hit(CrashPoint.LEASE_RELEASE_AFTER_JOURNAL)
        record = await self._ctx.executor.call(self._ctx.store.partition, lease.partition_uuid)
        try:
            await self._fences.fence_cgroup(lease.cgroup)
            failpoints.hit(CrashPoint.LEASE_RELEASE_AFTER_REVOKE)
            await self._ctx.executor.call(
                cdi.remove_spec, self._ctx.config.leases.cdi_dir, lease_id
            )
            if record is not None and record.present:
                await self._revoker.evict(record, lease)
            failpoints.hit(CrashPoint.LEASE_RELEASE_AFTER_EVICT)
        except StoreError:
            raise  # transient: the lease stays releasing and the agent retries it
        except AccelguardError as error:
            await self._ctx.executor.call(self._ctx.store.finish_release, lease_id)
            result = await self._sanitizer.quarantine(
                lease.partition_uuid, f"release failed: {error}"
            )
            return await self._record_outcome(lease_id, result)
        await self._ctx.executor.call(self._ctx.store.finish_release, lease_id)
        log.info("lease_released", lease=lease_id, partition=lease.partition_uuid)
        if record is None or not record.present:
            result = await self._sanitizer.quarantine(
                lease.partition_uuid, "partition vanished while it was leased"
            )
        else:
            result = await self._sanitizer.scrub(lease.partition_uuid, lease_id)
        return await self._record_outcome(lease_id, result)

    async def _record_outcome(self, lease_id: str, record: PartitionRecord) -> PartitionRecord:
        if record.state == PartitionState.FREE and record.clean:
            outcome = "clean"
        else:
            outcome = f"{record.state}: {record.reason or 'no reason recorded'}"
        await self._ctx.executor.call(self._ctx.store.set_lease_outcome, lease_id, outcome)
        await self._ctx.report_lease(lease_id)
        return record

    async def quarantine(self, partition_uuid: str, reason: str) -> PartitionRecord:
        if not reason.strip():
            raise ValidationError("a quarantine needs a --reason")
        async with self._ctx.locks[partition_uuid]:
            record = await self._ctx.present(partition_uuid)
            if record.state in ("leased", "releasing", "scrubbing"):
                raise ValidationError(
                    f"partition {partition_uuid} is {record.state}; release its lease first"
                )
            return await self._sanitizer.quarantine(partition_uuid, f"operator: {reason.strip()}")

    async def clear(self, partition_uuid: str, reason: str) -> PartitionRecord:
        """An operator ends a quarantine; the partition is scrubbed again before anyone gets it."""
        if not reason.strip():
            raise ValidationError("clearing a quarantine needs a --reason")
        async with self._ctx.locks[partition_uuid]:
            record = await self._ctx.present(partition_uuid)
            if record.state != "quarantined":
                raise ValidationError(
                    f"partition {partition_uuid} is not quarantined ({record.state})"
                )
            # The operator's action ends a GPU health hold too (docs/health.md).
            if await self._ctx.executor.call(self._health.release_hold, partition_uuid):
                log.warning("health_hold_cleared", partition=partition_uuid, reason=reason)
            # Whoever was using it when it was quarantined (an orphan fence's tenant, a holder
            # from before a lost journal) must be gone before the scrub starts (invariant 2).
            try:
                await self._revoker.evict_strays(record)
            except AccelguardError as error:
                return await self._sanitizer.quarantine(partition_uuid, f"clear refused: {error}")
            log.info("quarantine_cleared", partition=partition_uuid, reason=reason)
            return await self._sanitizer.scrub(partition_uuid, None, operator_accepts=True)

    async def sanitize(self, partition_uuid: str) -> PartitionRecord:
        """Scrub a free dirty partition (new, unknown to the journal, or before destroying it)."""
        async with self._ctx.locks[partition_uuid]:
            # A scrub that was running when we asked held the lock: the state is final now.
            record = await self._ctx.present(partition_uuid)
            if record.state != "free" or record.clean:
                return record
            return await self._sanitizer.scrub(partition_uuid, record.last_lease_id)

    def spawn(self, work: Coroutine[Any, Any, object], name: str) -> None:
        task: asyncio.Task[object] = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def wake(self) -> None:
        self._wake.set()

    async def _expire(self, live: list[LeaseRecord]) -> float:
        """Start the release of every expired lease; seconds until the next expiry."""
        now = time.time()
        next_expiry = math.inf
        for lease in live:
            if lease.state != LeaseState.ACTIVE or lease.expires_at is None:
                continue
            if lease.expires_at > now:
                next_expiry = min(next_expiry, lease.expires_at - now)
            elif lease.id not in self._releases:
                log.info("lease_expired", lease=lease.id, tenant=lease.tenant)
                self._start_release(lease.id, "expired")
        return next_expiry

    def _retry_releases(self, live: list[LeaseRecord]) -> None:
        """A release interrupted by a transient failure is picked up again (never stuck)."""
        live_ids = {lease.id for lease in live}
        for lease_id in [i for i in self._wanted if i not in live_ids]:
            del self._wanted[lease_id]  # ended another way meanwhile
        for lease in live:
            wanted = lease.state == LeaseState.RELEASING or lease.id in self._wanted
            if wanted and lease.id not in self._releases:
                log.info("lease_release_retried", lease=lease.id)
                self._start_release(
                    lease.id, self._wanted.get(lease.id) or lease.release_reason or "released"
                )

    async def _sanitize_dirty(self) -> None:
        """Scrub free dirty partitions, and finish releases a transient journal failure cut
        short after their revoke (the lease released, its partition left releasing or
        scrubbing with no task on it): nobody has to release again for them to end."""
        for record in await self.partitions():
            if record.uuid in self._sanitizing:
                continue
            cut_short = (
                record.state in (PartitionState.RELEASING, PartitionState.SCRUBBING)
                and record.lease_id is None
                and record.last_lease_id is not None
                and record.last_lease_id not in self._releases
                and not self._ctx.locks[record.uuid].locked()
            )
            if cut_short and record.last_lease_id is not None:
                self._sanitizing.add(record.uuid)
                work = self._finish_cut_short(record.uuid, record.last_lease_id)
                self.spawn(work, f"finish release {record.last_lease_id}")
            elif record.state == "free" and not record.clean:
                self._sanitizing.add(record.uuid)
                self.spawn(self._sanitize_one(record.uuid), f"sanitize {record.uuid}")

    async def _finish_cut_short(self, partition_uuid: str, lease_id: str) -> None:
        try:
            async with self._ctx.locks[partition_uuid]:
                resumed = await self._sanitizer.resume(partition_uuid, lease_id)
                if resumed is not None:
                    log.warning("lease_release_finished", lease=lease_id, state=resumed.state)
                    await self._record_outcome(lease_id, resumed)
        except AccelguardError as error:
            log.error("lease_release_finish_failed", lease=lease_id, error=str(error))  # noqa: TRY400
        finally:
            self._sanitizing.discard(partition_uuid)

    async def _sanitize_one(self, partition_uuid: str) -> None:
        try:
            await self.sanitize(partition_uuid)
        except AccelguardError as error:
            log.error("sanitize_failed", partition=partition_uuid, error=str(error))  # noqa: TRY400
        finally:
            self._sanitizing.discard(partition_uuid)

    async def run(self) -> None:
        """The scheduler: it starts releases, retries and scrubs as tasks and never awaits
        them, so an expiry is acted on within a bounded delay whatever else runs (invariant 8)."""
        await self._ctx.inventory.ready.wait()
        await self._reconciler.at_start_up()
        last_audit = time.monotonic()
        retry_due = time.monotonic() + RELEASE_RETRY_S
        try:
            while True:
                self._wake.clear()
                timeout = 1.0
                try:
                    live = await self.leases(live_only=True)
                    timeout = min(timeout, max(0.01, await self._expire(live)))
                    if time.monotonic() >= retry_due:
                        self._retry_releases(live)
                        retry_due = time.monotonic() + RELEASE_RETRY_S
                    await self._sanitize_dirty()
                    if (
                        time.monotonic() - last_audit
                        >= self._ctx.config.inventory.refresh_interval_s
                    ):
                        last_audit = time.monotonic()
                        await self._reconciler.audit_fences()
                except AccelguardError as error:
                    # A full disk or a kernel refusal must not stop expiry for good: retry.
                    log.error("lease_service_step_failed", error=str(error))  # noqa: TRY400
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
        finally:
            for task in [*self._tasks, *self._releases.values()]:
                task.cancel()
