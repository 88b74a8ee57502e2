"""NPU health through DCMI (docs/npu.md, "Health"): the Ascend counterpart of the GPU monitor.

Every ``[health] poll_interval_s`` each NPU's DCMI health is read. ``major`` (2) or ``critical``
(3) is a fault: the event is journaled with a hold on every partition of the NPU (the whole NPU
or its vNPUs) before anything acts on it, then the lease service quarantines them (a leased one
ends ``lost``: fenced off, evicted). Only ``partition clear`` lifts the hold. ``minor`` (1) is
logged. An NPU that stops answering drops out of the inventory, and the reconciler handles its
partitions as vanished.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Protocol

import structlog

from agent.errors import AccelguardError
from agent.health.monitor import FaultSink
from agent.hw.model import HUAWEI
from agent.partitions.inventory import InventoryService
from agent.runtime.executor import BlockingExecutor
from agent.store import Store
from agent.store.health import HealthLog

log = structlog.get_logger(__name__)

# dcmi_get_device_health (DCMI API reference): 0 normal, 1 minor, 2 major, 3 critical alarm.
MINOR, MAJOR = 1, 2
_NAMES = {0: "normal", 1: "minor", 2: "major", 3: "critical"}


class NpuHealthSource(Protocol):
    def health(self, index: int) -> tuple[int, tuple[int, ...]]: ...


class NpuHealthMonitor:
    def __init__(
        self,
        source: NpuHealthSource,
        store: Store,
        executor: BlockingExecutor,
        inventory: InventoryService,
        faults: FaultSink,
        interval_s: float,
    ) -> None:
        self._source = source
        self._log = HealthLog(store)
        self._store = store
        self._executor = executor
        self._inventory = inventory
        self._faults = faults
        self._interval_s = interval_s
        self._minor: set[str] = set()

    async def run(self) -> None:
        await self._inventory.ready.wait()
        while True:
            try:
                await self.poll()
            except AccelguardError as error:
                log.error("npu_health_poll_failed", error=str(error))  # noqa: TRY400 - one line
            await asyncio.sleep(self._interval_s)

    async def poll(self) -> None:
        for npu in self._inventory.snapshot.devices(HUAWEI):
            try:
                code, errors = await self._executor.call(self._source.health, npu.index)
            except AccelguardError as error:
                # One NPU that cannot be read must not stop the round for the others; it drops
                # out of the next inventory if it is gone.
                log.error("npu_health_unreadable", npu=npu.index, error=str(error))  # noqa: TRY400
                continue
            name = _NAMES.get(code, f"unknown ({code})")
            codes = ", ".join(f"{error:#010x}" for error in errors) or "none"
            if code < MAJOR:
                if code == MINOR and npu.uuid not in self._minor:
                    log.warning("npu_health_minor", npu=npu.index, error_codes=codes)
                    self._minor.add(npu.uuid)
                elif code != MINOR:
                    self._minor.discard(npu.uuid)
                continue
            partitions = [
                p.uuid
                for p in await self._executor.call(self._store.partitions)
                if p.gpu_uuid == npu.uuid and p.present
            ]
            holds = {h.partition_uuid for h in await self._executor.call(self._log.holds)}
            if partitions and all(uuid in holds for uuid in partitions):
                continue  # journaled and held already (an earlier poll, before a restart)
            detail = f"NPU {npu.index} health {name} (DCMI), error codes {codes}"
            record = functools.partial(
                self._log.record, gpu_uuid=npu.uuid, gpu_index=npu.index, kind="npu_health",
                code=code, action="quarantine", detail=detail, partitions=partitions, hold=True,
            )  # fmt: skip
            await self._executor.call(record)
            log.error("npu_health_fault", npu=npu.index, health=name, error_codes=codes,
                      partitions=partitions)  # fmt: skip
            await self._faults.health_fault(partitions, detail)
