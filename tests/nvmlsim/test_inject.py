"""agent.sim.inject: faults written into a simulated node's control files, read back through
pynvml exactly as the agent reads them."""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Any

import pynvml
import pytest

from agent.errors import ValidationError
from agent.sim import inject
from tests.nvmlsim.simdir import SimDir

XID = pynvml.nvmlEventTypeXidCriticalError
NO_INSTANCE = 0xFFFFFFFF


def gpu(index: int) -> Any:
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def events(event_set: Any) -> list[tuple[int | None, int, int, int]]:
    """(device address, xid, GI id, CI id) of every event ready now."""
    found = []
    while True:
        try:
            data = pynvml.nvmlEventSetWait_v2(event_set, 0)
        except pynvml.NVMLError_Timeout:
            return found
        address = ctypes.cast(data.device, ctypes.c_void_p).value
        found.append((address, data.eventData, data.gpuInstanceId, data.computeInstanceId))


def address(handle: Any) -> int | None:
    return ctypes.cast(handle, ctypes.c_void_p).value


def test_xids_reach_registered_event_sets(sim: SimDir) -> None:
    event_set = pynvml.nvmlEventSetCreate()
    try:
        pynvml.nvmlDeviceRegisterEvents(gpu(1), XID, event_set)
        inject.inject_xid(sim.path, 1, 48)
        inject.inject_xid(str(sim.path), 1, 94, gi=3, ci=0)
        inject.inject_xid(sim.path, 0, 31)  # GPU 0 is not registered
        assert events(event_set) == [
            (address(gpu(1)), 48, NO_INSTANCE, NO_INSTANCE),
            (address(gpu(1)), 94, 3, 0),
        ]
    finally:
        pynvml.nvmlEventSetFree(event_set)
    assert (sim.path / "xid").read_text() == "1 48\n1 94 3 0\n0 31\n"


def test_ecc_counts_set_volatile_and_aggregate(sim: SimDir) -> None:
    ecc = pynvml.nvmlDeviceGetTotalEccErrors
    corrected, uncorrected = (
        pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
        pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
    )
    volatile, aggregate = pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC
    inject.set_ecc(sim.path, 1, "dbe", 2)
    inject.set_ecc(sim.path, 1, inject.EccKind.SBE, 17)
    assert ecc(gpu(1), uncorrected, volatile) == ecc(gpu(1), uncorrected, aggregate) == 2
    assert ecc(gpu(1), corrected, volatile) == ecc(gpu(1), corrected, aggregate) == 17
    inject.set_ecc(sim.path, 1, "dbe", 0, aggregate=False)  # a reset clears volatile only
    assert (ecc(gpu(1), uncorrected, volatile), ecc(gpu(1), uncorrected, aggregate)) == (0, 2)
    inject.set_ecc(sim.path, 1, "dbe", (1 << 64) - 1)
    assert ecc(gpu(1), uncorrected, aggregate) == (1 << 64) - 1
    assert ecc(gpu(0), uncorrected, aggregate) == 0


def test_remap_temperature_and_recovery(sim: SimDir) -> None:
    inject.set_remap(sim.path, 0, pending=True, failure=False)
    assert pynvml.nvmlDeviceGetRemappedRows(gpu(0))[2:] == (1, 0)
    inject.set_remap(sim.path, 0, pending=False, failure=True)
    assert pynvml.nvmlDeviceGetRemappedRows(gpu(0))[2:] == (0, 1)
    inject.set_temperature(sim.path, 2, 93)
    assert pynvml.nvmlDeviceGetTemperature(gpu(2), pynvml.NVML_TEMPERATURE_GPU) == 93
    assert pynvml.nvmlDeviceGetTemperature(gpu(0), pynvml.NVML_TEMPERATURE_GPU) == 35


def test_lost_gpu_logs_xid_79_after_it_is_lost(sim: SimDir) -> None:
    event_set = pynvml.nvmlEventSetCreate()
    try:
        lost_handle = gpu(0)
        pynvml.nvmlDeviceRegisterEvents(lost_handle, XID, event_set)
        inject.set_lost(sim.path, 0)
        data = pynvml.nvmlEventSetWait_v2(event_set, 0)
        assert (address(data.device), data.eventData) == (address(lost_handle), 79)
        with pytest.raises(pynvml.NVMLError_GpuIsLost):
            pynvml.nvmlDeviceGetIndex(data.device)
        with pytest.raises(pynvml.NVMLError_GpuIsLost):
            pynvml.nvmlEventSetWait_v2(event_set, 0)
        inject.set_lost(sim.path, 0, lost=False)  # back, and no event for it
        assert pynvml.nvmlDeviceGetIndex(gpu(0)) == 0
        assert events(event_set) == []
    finally:
        pynvml.nvmlEventSetFree(event_set)
    assert (sim.path / "xid").read_text() == "0 79\n"


def test_health_keeps_other_writers_lines_and_is_replaced_whole(sim: SimDir) -> None:
    (sim.path / "health").write_text("2 power_mw 300000\n1 temperature_c 77")  # unterminated
    inode = (sim.path / "health").stat().st_ino
    inject.set_ecc(sim.path, 0, "sbe", 5)
    assert (sim.path / "health").read_text() == (
        "2 power_mw 300000\n1 temperature_c 77\n"
        "0 ecc_volatile_corrected 5\n0 ecc_aggregate_corrected 5\n"
    )
    assert (sim.path / "health").stat().st_ino != inode  # renamed over, not written in place
    assert (sim.path / "health").stat().st_mode & 0o777 == 0o644
    assert pynvml.nvmlDeviceGetPowerUsage(gpu(2)) == 300000
    assert pynvml.nvmlDeviceGetTemperature(gpu(1), 0) == 77
    assert not [p.name for p in sim.path.iterdir() if p.name.startswith(".health.")]


def test_concurrent_injectors_lose_no_line(sim: SimDir) -> None:
    def inject_many(index: int) -> None:
        for value in range(25):
            inject.set_temperature(sim.path, index % 3, value)
            inject.inject_xid(sim.path, index % 3, 100 + value)

    threads = [threading.Thread(target=inject_many, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    health = (sim.path / "health").read_text().splitlines()
    xids = (sim.path / "xid").read_text().splitlines()
    assert len(health) == len(xids) == 100
    for index in range(4):
        expected = {f"{index % 3} temperature_c {value}" for value in range(25)}
        assert expected <= set(health)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d: inject.inject_xid(d, 3, 48), "GPU index 3 does not exist (this node has 3)"),
        (lambda d: inject.inject_xid(d, -1, 48), "GPU index -1 does not exist"),
        (lambda d: inject.inject_xid(d, True, 48), "GPU index True: expected an integer"),
        (lambda d: inject.inject_xid(d, 0, 0), "xid 0 is out of range (1-65535)"),
        (lambda d: inject.inject_xid(d, 0, 65536), "xid 65536 is out of range (1-65535)"),
        (lambda d: inject.inject_xid(d, 0, 48, gi=1), "both a GPU instance"),
        (lambda d: inject.inject_xid(d, 0, 48, ci=0), "both a GPU instance"),
        (lambda d: inject.inject_xid(d, 0, 48, 15, 0), "GPU instance id 15 is out of range"),
        (lambda d: inject.inject_xid(d, 0, 48, 1, 8), "compute instance id 8 is out of range"),
        (lambda d: inject.set_ecc(d, 0, "tbe", 1), "ECC error kind 'tbe'"),
        (lambda d: inject.set_ecc(d, 0, "sbe", -1), "ECC error count -1 is out of range"),
        (lambda d: inject.set_ecc(d, 0, "sbe", 1 << 64), "is out of range"),
        (lambda d: inject.set_remap(d, 0, 1, False), "pending 1: expected True or False"),
        (lambda d: inject.set_lost(d, 5), "GPU index 5 does not exist"),
        (lambda d: inject.set_temperature(d, 0, -3), "temperature (degrees C) -3 is out"),
        (lambda d: inject.set_temperature(d, 0, 201), "out of range (0-200)"),
        (lambda d: inject.set_temperature(d / "nowhere", 0, 50), "not a simulated node"),
    ],
)
def test_bad_arguments_change_nothing(sim: SimDir, call: Any, message: str) -> None:
    before = sorted(p.name for p in sim.path.iterdir())
    with pytest.raises(ValidationError) as raised:
        call(sim.path)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)
    assert sorted(p.name for p in sim.path.iterdir()) == before
    assert not (sim.path / "xid").exists()
    assert not (sim.path / "health").exists()


def test_gpu_count_reads_the_topology(tmp_path: Path) -> None:
    (tmp_path / "topology").write_text(
        "# a node\ngpu 0 H100-80GB mig=1 # first\n\ngpu 1 A100-40GB mig=0\n"
    )
    assert inject.gpu_count(tmp_path) == 2
