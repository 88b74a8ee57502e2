"""What every part of the lease state machine shares: the journal, the inventory, the hardware,
one lock per partition, and how a partition maps to its device nodes.

The parts (``fencing``, ``revocation``, ``sanitize``, ``reconcile``) and the orchestrating
``leases.LeaseManager`` each take this one context instead of a long list of services.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from agent.config import Config
from agent.errors import AccelguardError, NotFoundError, OutboxFullError, StoreError
from agent.hw.devnodes import DeviceNode
from agent.hw.model import AcceleratorBackend, DeviceInfo
from agent.partitions.inventory import InventoryService
from agent.runtime.executor import BlockingExecutor
from agent.store import LeaseRecord, PartitionRecord, Store

log = structlog.get_logger(__name__)


class PartitionEvents(Protocol):
    """Where lease and partition transitions are reported (the controller link's outbox).

    ``lease_changed`` for a lease in state ``granting`` raises OutboxFullError when its events
    could not be kept: the grant is then refused, so no lease runs without its record upstream.
    """

    async def lease_changed(self, lease: LeaseRecord) -> None: ...

    async def partition_changed(self, partition: PartitionRecord) -> None: ...


class NoEvents:
    """A node without a controller link: transitions stay in the local journal only."""

    async def lease_changed(self, lease: LeaseRecord) -> None:  # noqa: ARG002 - nowhere to send
        return None

    async def partition_changed(self, partition: PartitionRecord) -> None:  # noqa: ARG002
        return None


@dataclass
class PartitionContext:
    config: Config
    store: Store
    executor: BlockingExecutor
    inventory: InventoryService
    backend: AcceleratorBackend
    # One holder of a partition at a time: grant, release, scrub and clear take its lock.
    locks: defaultdict[str, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    # Device nodes of partitions whose lease was lost: the inventory no longer knows them.
    lost_nodes: dict[str, list[DeviceNode]] = field(default_factory=dict)
    events: PartitionEvents = field(default_factory=NoEvents)

    async def report_lease(self, lease_id: str, *, must_keep: bool = False) -> None:
        """Report a lease's journaled state. ``must_keep``: an OutboxFullError reaches the
        caller (a grant refuses); otherwise a report that cannot be kept is logged and the
        transition goes on (the journal still holds it)."""
        if isinstance(self.events, NoEvents):
            return  # nowhere to send it: not even worth the journal read
        lease = await self.executor.call(self.store.lease, lease_id)
        if lease is None:
            return
        try:
            await self.events.lease_changed(lease)
        except OutboxFullError:
            if must_keep:
                raise
            log.error("lease_event_not_reported", lease=lease_id, error="link outbox full")  # noqa: TRY400
        except AccelguardError as error:
            log.error("lease_event_not_reported", lease=lease_id, error=str(error))  # noqa: TRY400

    async def report_partition(self, partition_uuid: str) -> None:
        if isinstance(self.events, NoEvents):
            return
        record = await self.executor.call(self.store.partition, partition_uuid)
        if record is None:
            return
        try:
            await self.events.partition_changed(record)
        except AccelguardError as error:
            log.error(  # noqa: TRY400 - expected, one line
                "partition_event_not_reported", partition=partition_uuid, error=str(error)
            )

    async def audit(
        self,
        action: str,
        *,
        outcome: str = "ok",
        lease_id: str | None = None,
        partition_uuid: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """One audit record for an action that changes no journal row (a fence, an eviction).
        A journal that cannot take it fails the action: nothing unrecorded happens."""
        await self.executor.call(
            lambda: self.store.audit(
                action, outcome=outcome, lease_id=lease_id, partition_uuid=partition_uuid,
                detail=detail,
            )
        )  # fmt: skip

    async def partitions(self) -> list[PartitionRecord]:
        return await self.executor.call(self.store.partitions)

    async def leases(self, live_only: bool = False) -> list[LeaseRecord]:
        return await self.executor.call(lambda: self.store.leases(live_only=live_only))

    async def stored(self, partition_uuid: str) -> PartitionRecord:
        """The journal's row, present or not."""
        record = await self.executor.call(self.store.partition, partition_uuid)
        if record is None:
            raise StoreError(f"partition {partition_uuid} vanished from the journal")
        return record

    async def present(self, partition_uuid: str) -> PartitionRecord:
        """The partition as an operator names it: it must exist on the node now."""
        record = await self.executor.call(self.store.partition, partition_uuid)
        if record is None or not record.present:
            raise NotFoundError(f"partition {partition_uuid} does not exist on this node")
        return record

    def nodes(self, record: PartitionRecord) -> list[DeviceNode]:
        if record.uuid in self.lost_nodes:
            return self.lost_nodes[record.uuid]
        nodes = self.inventory.nodes_for(record)
        if not nodes:
            raise NotFoundError(f"partition {record.uuid}: its GPU is not in the inventory")
        return nodes

    def gpu(self, record: PartitionRecord) -> DeviceInfo:
        for gpu in self.inventory.snapshot.gpus:
            if gpu.uuid == record.gpu_uuid:
                return gpu
        raise NotFoundError(
            f"partition {record.uuid}: GPU {record.gpu_uuid} is not in the inventory"
        )
