"""Sanitising: scrub a partition nobody holds, certify the result, and quarantine on any doubt.

``clean`` becomes true only here, only on a verified scrub, and only for the partition identity
that was scrubbed (invariants 2 and 6). Every scrub that produced a result gets a signed
certificate, failed ones included.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import cast

import structlog

from agent.errors import AccelguardError, ScrubError, StoreError
from agent.identity.node_key import NodeKey
from agent.partitions.context import PartitionContext
from agent.runtime import failpoints
from agent.runtime.failpoints import CrashPoint
from agent.scrub.certificate import issue_certificate
from agent.scrub.model import RESET_POLICY, ScrubKind, ScrubResult, ScrubTarget
from agent.scrub.reset import reset_scrub
from agent.scrub.runner import ScrubOutcome, ScrubRunner
from agent.store import PartitionRecord, PartitionState
from agent.store.health import HealthLog

log = structlog.get_logger(__name__)


class Sanitizer:
    def __init__(self, context: PartitionContext, scrubber: ScrubRunner, node_key: NodeKey) -> None:
        self._health = HealthLog(context.store)
        self._ctx = context
        self._scrubber = scrubber
        self._node_key = node_key

    async def _set_state(
        self, partition_uuid: str, state: str, *, clean: bool, reason: str | None = None
    ) -> None:
        await self._ctx.executor.call(
            lambda: self._ctx.store.set_partition_state(
                partition_uuid, state, clean=clean, reason=reason
            )
        )

    def scrub_target(self, record: PartitionRecord) -> ScrubTarget:
        gpu = self._ctx.gpu(record)
        total = gpu.memory_total_bytes
        units: tuple[int, ...] = ()
        for instance in gpu.instances:
            if instance.uuid == record.uuid:
                total = instance.memory_bytes
                units = instance.units
        kind = cast(ScrubKind, record.kind)  # the journal's CHECK holds it to ScrubKind
        mig = kind == "mig"
        if kind == "vnpu" and not units:
            raise ScrubError(f"vNPU {record.uuid}: DCMI does not say which memory it owns")
        return ScrubTarget(
            partition_uuid=record.uuid, gpu_uuid=gpu.uuid, gpu_index=gpu.index,
            kind=kind, visible_device=record.uuid, total_bytes=total,
            placement_start=record.placement_start if mig else None,
            placement_size=record.placement_size if mig else None,
            units=units, unit_total=gpu.memory_units,
        )  # fmt: skip

    async def scrub(
        self, partition_uuid: str, lease_id: str | None, *, operator_accepts: bool = False
    ) -> PartitionRecord:
        """Scrub a partition nobody holds; clean only on a verified result (invariant 2).

        Every scrub that produced a result gets a signed certificate, failed ones included (they
        say ``verified: false``): the evidence of what was and was not proven. A /dev/accel
        device can only be reset, never verified: it is freed only where ``[scrub]
        accept_unverified`` is on or an operator clearing its quarantine accepts it
        (``operator_accepts``); otherwise it is quarantined.
        """
        lease = await self._ctx.executor.call(self._ctx.store.lease, lease_id) if lease_id else None
        policy = (lease.scrub_policy if lease else "") or self._ctx.config.scrub.policy
        record = await self._ctx.stored(partition_uuid)
        if not record.present:
            return await self.quarantine(partition_uuid, "partition vanished before its scrub")
        moved = await self._ctx.executor.call(
            lambda: self._ctx.store.transition(
                partition_uuid,
                (PartitionState.FREE, PartitionState.RELEASING, PartitionState.QUARANTINED),
                PartitionState.SCRUBBING, clean=False,
            )
        )  # fmt: skip
        if not moved:
            raise StoreError(f"partition {partition_uuid} changed state before its scrub")
        failpoints.hit(CrashPoint.SCRUB_AFTER_JOURNAL)
        # The clean flag this scrub may set belongs to the identity it scrubbed (invariant 6).
        identity = record.identity
        started = time.time()
        try:
            target = self.scrub_target(record)
            if record.kind == "accel":
                outcome: ScrubOutcome = await self._reset(record)
            else:
                outcome = await self._scrubber.scrub(target, policy)
        except AccelguardError as error:
            await self._ctx.executor.call(
                self._ctx.store.record_scrub,
                partition_uuid, lease_id, started, time.time(), False, {}, str(error),
            )  # fmt: skip
            return await self.quarantine(partition_uuid, f"scrub failed: {error}")
        failpoints.hit(CrashPoint.SCRUB_AFTER_SCRUB)
        certificate = issue_certificate(
            self._node_key,
            node_id=self._ctx.config.node.id,
            target=target,
            gpu_serial=self._ctx.gpu(record).serial,
            previous_lease_id=lease.id if lease else "",
            previous_tenant=lease.tenant if lease else "",
            result=outcome.result,
            started_at=datetime.fromtimestamp(outcome.started_at, UTC),
            finished_at=datetime.fromtimestamp(outcome.finished_at, UTC),
        )
        # The journal's scrub row says whether it was verified; an accepted reset is not.
        clean = outcome.failure is None and outcome.result.verified
        await self._ctx.executor.call(
            self._ctx.store.record_scrub, partition_uuid, lease_id, outcome.started_at,
            outcome.finished_at, clean, outcome.result.to_dict(), outcome.failure or "",
            certificate,
        )  # fmt: skip
        if outcome.failure is not None:
            return await self.quarantine(partition_uuid, f"scrub failed: {outcome.failure}")
        if outcome.result.policy == RESET_POLICY:
            accepted = operator_accepts or self._ctx.config.scrub.accept_unverified
            if not accepted:
                return await self.quarantine(
                    partition_uuid,
                    "unverifiable scrub: a PCI function reset cannot prove the memory clean "
                    "([scrub] accept_unverified is off; `partition clear` accepts it)",
                )
        # A GPU health fault holds the partition until an operator clears it: no scrub frees it
        # (the scrub's certificate above is kept all the same).
        hold = await self._ctx.executor.call(self._health.hold, partition_uuid)
        if hold is not None:
            return await self.quarantine(partition_uuid, f"held by {hold.reason}")
        cleaned = await self._ctx.executor.call(
            lambda: self._ctx.store.transition(
                partition_uuid, (PartitionState.SCRUBBING,), PartitionState.FREE, clean=True,
                reason="", identity=identity,
            )
        )  # fmt: skip
        if not cleaned:
            return await self.quarantine(
                partition_uuid, "partition changed or vanished while it was scrubbed"
            )
        log.info(
            "partition_scrubbed", partition=partition_uuid, lease=lease_id, policy=policy,
            bytes=outcome.result.bytes_verified, coverage=outcome.result.coverage,
        )  # fmt: skip
        await self._ctx.report_partition(partition_uuid)
        return await self._ctx.stored(partition_uuid)

    async def _reset(self, record: PartitionRecord) -> ScrubOutcome:
        """A /dev/accel device's only scrub: a PCI function reset, which nothing verifies."""
        accel = self._ctx.inventory.accel
        if accel is None:
            raise ScrubError(f"partition {record.uuid}: the accel backend is off")
        device = self._ctx.gpu(record)
        started = time.time()
        reset = await self._ctx.executor.call(reset_scrub, accel, device)
        result = ScrubResult(
            backend="pci-reset", policy=RESET_POLICY, total_bytes=device.memory_total_bytes,
            detail=f"{reset.detail}; the device's memory cannot be read back: nothing verified",
        )  # fmt: skip
        return ScrubOutcome(result, started, time.time(), failure=None)

    async def resume(self, partition_uuid: str, lease_id: str) -> PartitionRecord | None:
        """Finish the scrub of a released lease whose release a transient journal failure cut
        short after the revoke (the lease is released, its outcome not recorded; the partition is
        left scrubbing or releasing). Caller holds the partition lock, and every scrub runs under
        it: a partition found scrubbing is one whose scrub was interrupted. None when the
        partition has moved on (another lease, a finished scrub) and there is nothing to do."""
        record = await self._ctx.stored(partition_uuid)
        if record.lease_id is not None or record.last_lease_id != lease_id:
            return None  # leased again, or released since by another lease
        if record.state == PartitionState.SCRUBBING:
            await self._ctx.executor.call(
                lambda: self._ctx.store.transition(
                    partition_uuid, (PartitionState.SCRUBBING,), PartitionState.RELEASING,
                    clean=False,
                )
            )  # fmt: skip
        elif record.state != PartitionState.RELEASING:
            return None
        return await self.scrub(partition_uuid, lease_id)

    async def certificates(self, partition_uuid: str = "") -> list[dict[str, object]]:
        return await self._ctx.executor.call(self._ctx.store.certificates, partition_uuid or None)

    async def quarantine(self, partition_uuid: str, reason: str) -> PartitionRecord:
        await self._set_state(partition_uuid, "quarantined", clean=False, reason=reason)
        log.error("partition_quarantined", partition=partition_uuid, reason=reason)
        await self._ctx.report_partition(partition_uuid)
        return await self._ctx.stored(partition_uuid)
