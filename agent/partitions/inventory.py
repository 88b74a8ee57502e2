"""Inventory: what accelerators and partitions the node has, refreshed on a timer and on hotplug.

Each refresh records the partitions in the journal. A partition the journal has never seen starts
dirty: nobody can vouch for what its memory holds (DESIGN.md lease invariant 4).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from agent.errors import AccelguardError, HardwareError
from agent.hw.ascend.nodes import npu_nodes, vnpu_nodes
from agent.hw.devnodes import DeviceNode, DeviceNodeMap
from agent.hw.model import ACCEL, HUAWEI, NVIDIA, DeviceInfo, DeviceSource
from agent.runtime.executor import BlockingExecutor
from agent.store import PartitionRecord, Store, SyncResult
from agent.store.siblings import vnpu_identity

log = structlog.get_logger(__name__)

NEW_PARTITION_REASON = "new partition: memory not yet scrubbed"


@dataclass(frozen=True)
class Snapshot:
    driver_version: str
    # Every accelerator of the node, GPUs first, then NPUs, then /dev/accel devices.
    gpus: tuple[DeviceInfo, ...]

    def devices(self, vendor: str) -> list[DeviceInfo]:
        return [device for device in self.gpus if device.vendor == vendor]


def _whole(device: DeviceInfo, identity: str) -> PartitionRecord:
    return PartitionRecord(
        uuid=device.uuid, kind=device.kind, gpu_uuid=device.uuid, gpu_index=device.index,
        gi_id=None, ci_id=None, profile="", placement_start=None, placement_size=None,
        state="free", clean=False, reason=NEW_PARTITION_REASON, present=True, updated_at=0.0,
        identity=identity,
    )  # fmt: skip


def _npu_partitions(npu: DeviceInfo) -> list[PartitionRecord]:
    """A whole NPU while it has no vNPUs; once split, only its vNPUs (a split chip is not
    usable whole, as in Ascend's container mode)."""
    if not npu.instances:
        return [_whole(npu, f"npu {npu.uuid} whole (no vNPUs)")]
    result = []
    for vnpu in npu.instances:
        result.append(
            PartitionRecord(
                uuid=vnpu.uuid, kind="vnpu", gpu_uuid=npu.uuid, gpu_index=npu.index,
                gi_id=vnpu.gpu_instance_id, ci_id=None, profile=vnpu.profile,
                placement_start=vnpu.placement_start, placement_size=vnpu.placement_size,
                state="free", clean=False, reason=NEW_PARTITION_REASON, present=True,
                updated_at=0.0,
                identity=vnpu_identity(npu.uuid, vnpu.gpu_instance_id, vnpu.profile, vnpu.units),
            )
        )  # fmt: skip
    return result


def partitions_of(gpus: tuple[DeviceInfo, ...]) -> list[PartitionRecord]:
    """The partitions the hardware offers: whole GPUs with MIG off, MIG instances with MIG on;
    whole NPUs or their vNPUs; whole /dev/accel devices."""
    result: list[PartitionRecord] = []
    for gpu in gpus:
        if gpu.vendor == HUAWEI:
            result.extend(_npu_partitions(gpu))
            continue
        if gpu.vendor == ACCEL:
            result.append(_whole(gpu, f"accel {gpu.uuid} {gpu.driver} whole"))
            continue
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


class AccelDevices(DeviceSource, Protocol):
    """The /dev/accel backend as the inventory and the sanitiser need it."""

    def nodes(self, device: DeviceInfo) -> list[DeviceNode]: ...

    def reset(self, device: DeviceInfo) -> None: ...


def partition_nodes(
    device_nodes: DeviceNodeMap,
    accel: AccelDevices | None,
    device: DeviceInfo,
    partition: PartitionRecord,
) -> list[DeviceNode]:
    """The device nodes a tenant of ``partition`` (a partition of ``device``) opens."""
    dev_root = device_nodes.dev_root
    if partition.kind == "npu":
        return npu_nodes(dev_root, device.minor)
    if partition.kind == "vnpu":
        if partition.gi_id is None:
            raise HardwareError(f"partition {partition.uuid} is a vNPU without its vdev id")
        return vnpu_nodes(dev_root, partition.gi_id)
    if partition.kind == "accel":
        if accel is None:
            raise HardwareError(f"partition {partition.uuid}: the accel backend is off")
        return accel.nodes(device)
    if partition.kind == "gpu":
        return device_nodes.gpu_nodes(device.minor)
    if partition.gi_id is None or partition.ci_id is None:
        raise HardwareError(f"partition {partition.uuid} is a MIG partition without GI/CI ids")
    return device_nodes.mig_nodes(device.minor, partition.gi_id, partition.ci_id)


class InventoryService:
    def __init__(
        self,
        sources: Sequence[DeviceSource],
        store: Store,
        device_nodes: DeviceNodeMap,
        executor: BlockingExecutor,
        interval_s: float,
        accel: AccelDevices | None = None,
    ) -> None:
        self._sources = tuple(sources)
        # The /dev/accel backend, where it is on: its nodes, and its reset for the sanitiser.
        self.accel = accel
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
        gpus = self.snapshot.devices(NVIDIA)
        instances = sum(len(gpu.instances) for gpu in gpus)
        text = f"{len(gpus)} GPUs, {instances} MIG instances"
        npus = self.snapshot.devices(HUAWEI)
        if npus:
            text += f", {len(npus)} NPUs, {sum(len(n.instances) for n in npus)} vNPUs"
        accels = self.snapshot.devices(ACCEL)
        if accels:
            text += f", {len(accels)} accel devices"
        return text

    def refresh_soon(self) -> None:
        self._wake.set()

    def _collect(self) -> tuple[Snapshot, SyncResult]:
        # Every backend must answer: a partial inventory would mark the silent backend's
        # partitions vanished and revoke their leases.
        versions = [source.driver_version() for source in self._sources]
        devices = tuple(device for source in self._sources for device in source.inventory())
        snapshot = Snapshot(driver_version=versions[0] if versions else "", gpus=devices)
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
                async with asyncio.timeout(self._interval_s):
                    await self._wake.wait()
            self._wake.clear()

    def nodes_for(self, partition: PartitionRecord) -> list[DeviceNode]:
        gpu = next((g for g in self.snapshot.gpus if g.uuid == partition.gpu_uuid), None)
        if gpu is None:
            return []
        return partition_nodes(self._device_nodes, self.accel, gpu, partition)
