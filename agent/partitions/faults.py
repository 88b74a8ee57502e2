"""What a GPU health fault does to partitions (agent/health/monitor.py decides which ones).

* A leased partition: its lease is **lost**, the same path as hardware changed behind our back
  (agent/partitions/reconcile.py): journaled with the partition's quarantine in one
  transaction, the fence recomputed without its nodes, the holders evicted.
* A free (or already quarantined) partition: quarantined.
* A partition being released or scrubbed: its own path ends in quarantine, because the monitor
  journaled a **hold** on it first and no scrub frees a held partition
  (agent/partitions/sanitize.py). Only ``partition clear`` lifts the hold.
"""

from __future__ import annotations

from collections.abc import Coroutine, Sequence
from typing import Any, Protocol

import structlog

from agent.partitions.context import PartitionContext
from agent.partitions.reconcile import Reconciler
from agent.partitions.sanitize import Sanitizer
from agent.store import PartitionState

log = structlog.get_logger(__name__)


class Spawner(Protocol):
    def spawn(self, work: Coroutine[Any, Any, object], name: str) -> None: ...


class HealthFaults:
    def __init__(
        self,
        context: PartitionContext,
        reconciler: Reconciler,
        sanitizer: Sanitizer,
        spawner: Spawner,
    ) -> None:
        self._ctx = context
        self._reconciler = reconciler
        self._sanitizer = sanitizer
        self._spawner = spawner

    async def health_fault(self, partition_uuids: Sequence[str], reason: str) -> None:
        for uuid in partition_uuids:
            async with self._ctx.locks[uuid]:
                record = await self._ctx.stored(uuid)
                if record.state == PartitionState.LEASED and record.lease_id:
                    lease = await self._ctx.executor.call(self._ctx.store.lease, record.lease_id)
                    if lease is not None:
                        # The tenant is fenced out and evicted by its own task (it takes the
                        # partition's lock only through the store's compare-and-set).
                        self._spawner.spawn(
                            self._reconciler.lose(lease, reason), f"health lose {lease.id}"
                        )
                        continue
                if record.state in (PartitionState.FREE, PartitionState.QUARANTINED):
                    await self._sanitizer.quarantine(uuid, reason)
                # Releasing or scrubbing: the journaled hold quarantines it when the scrub ends.

    async def lease_health_event(self, partition_uuid: str, reason: str) -> None:
        record = await self._ctx.stored(partition_uuid)
        if record.lease_id:
            log.warning("lease_health_event", lease=record.lease_id, partition=partition_uuid,
                        reason=reason)  # fmt: skip
            await self._ctx.report_lease(record.lease_id)
