"""Inventory: what accelerators and partitions the node has, refreshed on a timer and on hotplug.

Each refresh records the partitions in the journal. A partition the journal has never seen starts
dirty: nobody can vouch for what its memory holds (DESIGN.md lease invariant 4).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from agent.errors import AccelguardError, HardwareError
from agent.hw.devnodes import DeviceNode, DeviceNodeMap
from agent.hw.model import AcceleratorBackend, GpuInfo
from agent.runtime.executor import BlockingExecutor
from agent.store import PartitionRecord, Store, SyncResult

log = structlog.get_logger(__name__)

NEW_PARTITION_REASON = "new partition: memory not yet scrubbed"


@dataclass(frozen=True)
class Snapshot:
    driver_version: str
    gpus: tuple[GpuInfo, ...]


def partitions_of(gpus: tuple[GpuInfo, ...]) -> list[PartitionRecord]:
    """The partitions the hardware offers: whole GPUs with MIG off, MIG instances with MIG on."""
    result: list[PartitionRecord] = []
    for gpu in gpus:
        if not gpu.mig_current:
            result.append(
                PartitionRecord(
                    uuid=gpu.uuid, kind="gpu", gpu_uuid=gpu.uuid, gpu_index=gpu.index,
                    gi_id=None, ci_id=None, profile="", placement_start=None,
                    placement_size=None, state="free", clean=False,
                    reason=NEW_PARTITION_REASON, present=True, updated_at=0.0,
                    identity=f"gpu {gpu.uuid} whole (MIG off)",
                )
            )  # fmt: skip
            continue
        for instance in gpu.instances:
            if not instance.uuid:
                continue  # a GPU instance without its compute instance is not usable yet
            result.append(
                PartitionRecord(
                    uuid=instance.uuid, kind="mig", gpu_uuid=gpu.uuid, gpu_index=gpu.index,
                    gi_id=instance.gpu_instance_id, ci_id=instance.compute_instance_id,
                    profile=instance.profile, placement_start=instance.placement_start,
                    placement_size=instance.placement_size, state="free", clean=False,
                    reason=NEW_PARTITION_REASON, present=True, updated_at=0.0,
                    identity=(
                        f"gpu {gpu.uuid} MIG GI {instance.gpu_instance_id} "
                        f"CI {instance.compute_instance_id} profile {instance.profile_id} "
                        f"placement {instance.placement_start}+{instance.placement_size}"
                    ),
                )
            )  # fmt: skip
    return result


class InventoryService:
    def __init__(
        self,
        backend: AcceleratorBackend,
        store: Store,
        device_nodes: DeviceNodeMap,
        executor: BlockingExecutor,
        interval_s: float,
    ) -> None:
        self._backend = backend
        self._store = store
        self._device_nodes = device_nodes
        self._executor = executor
        self._interval_s = interval_s
        self._wake = asyncio.Event()
        self.ready = asyncio.Event()
        self.snapshot = Snapshot(driver_version="", gpus=())
        # One refresh at a time: each compares the hardware with the journal and must see the
        # journal as the previous refresh left it.
        self._refreshing = asyncio.Lock()
        # Awaited after every refresh with what changed (the lease reconciler), before the
        # refresh returns: a status right after a refresh already shows the consequences.
        self.on_sync: list[Callable[[SyncResult], Awaitable[None]]] = []

    def summary(self) -> str:
        gpus = self.snapshot.gpus
        instances = sum(len(gpu.instances) for gpu in gpus)
        return f"{len(gpus)} GPUs, {instances} MIG instances"

    def refresh_soon(self) -> None:
        self._wake.set()

    def _collect(self) -> tuple[Snapshot, SyncResult]:
        snapshot = Snapshot(
            driver_version=self._backend.driver_version(),
            gpus=tuple(self._backend.inventory()),
        )
        result = self._store.sync_partitions(partitions_of(snapshot.gpus))
        return snapshot, result

    async def refresh(self) -> Snapshot:
        async with self._refreshing:
            snapshot, result = await self._executor.call(self._collect)
            self._device_nodes.invalidate()
            self.snapshot = snapshot
            log.debug("inventory_refreshed", summary=self.summary())
            for uuid in result.new:
                log.info("partition_discovered", partition=uuid, clean=False)
            for listener in self.on_sync:
                await listener(result)
        return snapshot

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
                if not self.ready.is_set():
                    self.ready.set()
                    log.info("inventory_ready", summary=self.summary())
            except AccelguardError as error:
                log.error("inventory_failed", error=str(error))  # noqa: TRY400 - expected failure, one line
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._interval_s)
            self._wake.clear()

    def nodes_for(self, partition: PartitionRecord) -> list[DeviceNode]:
        gpu = next((g for g in self.snapshot.gpus if g.uuid == partition.gpu_uuid), None)
        if gpu is None:
            return []
        if partition.kind == "gpu":
            return self._device_nodes.gpu_nodes(gpu.minor)
        if partition.gi_id is None or partition.ci_id is None:
            raise HardwareError(f"partition {partition.uuid} is a MIG partition without GI/CI ids")
        return self._device_nodes.mig_nodes(gpu.minor, partition.gi_id, partition.ci_id)
