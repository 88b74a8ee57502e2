"""The health monitor on a real GPU, read-only: no injection, no setting changed. Every GPU is
read (ECC, row remapping, temperature, power, clock event reasons), the XID event set registers,
and the monitor reports the GPUs healthy with no fault acted on."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.health.monitor import HealthMonitor, HealthSettings
from agent.hw.health import XidWatcher, read_gpu_health
from agent.hw.nvml import NvmlBackend
from agent.runtime.executor import BlockingExecutor
from agent.store import Store


class RecordedFaults:
    """The lease service's side, recording what the monitor would have done."""

    def __init__(self) -> None:
        self.faults: list[tuple[list[str], str]] = []
        self.lease_events: list[tuple[str, str]] = []

    async def health_fault(self, partition_uuids: Sequence[str], reason: str) -> None:
        self.faults.append((list(partition_uuids), reason))

    async def lease_health_event(self, partition_uuid: str, reason: str) -> None:
        self.lease_events.append((partition_uuid, reason))


def test_every_gpu_reads_healthy(real_nvml: NvmlBackend, record: dict[str, Any]) -> None:
    readings = [read_gpu_health(index) for index in range(real_nvml.gpu_count())]
    record["health_readings"] = [reading.__dict__ for reading in readings]
    for reading in readings:
        assert reading.readable, reading
        assert reading.temperature_c is not None
        assert 0 < reading.temperature_c < 100
        assert not reading.remap_failure
        assert not reading.remap_pending


def test_xid_events_register_and_wait(real_nvml: NvmlBackend, record: dict[str, Any]) -> None:
    watcher = XidWatcher()
    watcher.open(real_nvml.gpu_count())
    try:
        record["xid_registered"] = watcher.registered
        record["xid_unregistered"] = watcher.unregistered
        assert watcher.registered, watcher.unregistered
        event = watcher.wait(200)
        record["xid_during_test"] = None if event is None else event.__dict__
    finally:
        watcher.close()


def test_the_monitor_reports_healthy(
    real_nvml: NvmlBackend, tmp_path: Path, record: dict[str, Any]
) -> None:
    store = Store(tmp_path / "agent.db")
    executor = BlockingExecutor()
    faults = RecordedFaults()
    monitor = HealthMonitor(real_nvml, store, executor, faults, HealthSettings())

    async def check() -> Any:
        await monitor.start()
        await monitor.poll(at_start=False)
        return await monitor.report(5)

    try:
        report = asyncio.run(check())
    finally:
        executor.shutdown()
        store.close()
    record["health_report"] = [(gpu.state.index, gpu.health) for gpu in report.gpus]
    assert report.started
    assert [gpu.health for gpu in report.gpus] == ["healthy"] * len(report.gpus)
    assert faults.faults == []
    assert report.holds == []
