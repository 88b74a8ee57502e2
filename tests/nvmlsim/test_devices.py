"""Enumeration, identity, memory, processes and health of the simulated GPUs."""

from __future__ import annotations

import ctypes
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pynvml
import pytest

from tests.nvmlsim.simdir import SimDir

NAMES = ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-80GB"]
UUID = re.compile(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def handles() -> list[Any]:
    return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]


def test_enumeration_names_and_indices(sim: SimDir) -> None:
    assert pynvml.nvmlDeviceGetCount() == 3
    for index, handle in enumerate(handles()):
        assert pynvml.nvmlDeviceGetName(handle) == NAMES[index]
        assert pynvml.nvmlDeviceGetIndex(handle) == index
        assert pynvml.nvmlDeviceGetMinorNumber(handle) == index
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceGetHandleByIndex(3)


def test_architecture(sim: SimDir) -> None:
    archs = [pynvml.nvmlDeviceGetArchitecture(h) for h in handles()]
    assert archs == [
        pynvml.NVML_DEVICE_ARCH_HOPPER,
        pynvml.NVML_DEVICE_ARCH_AMPERE,
        pynvml.NVML_DEVICE_ARCH_AMPERE,
    ]


def test_uuids_are_well_formed_distinct_and_deterministic(make_sim: Any) -> None:
    make_sim()
    first = [pynvml.nvmlDeviceGetUUID(h) for h in handles()]
    assert all(UUID.fullmatch(uuid) for uuid in first)
    assert len(set(first)) == 3
    pynvml.nvmlShutdown()
    make_sim()  # another node directory: the same index gives the same UUID
    assert [pynvml.nvmlDeviceGetUUID(h) for h in handles()] == first


def test_lookup_by_uuid_serial_and_pci_bus_id(sim: SimDir) -> None:
    for index, handle in enumerate(handles()):
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        by_uuid = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        assert pynvml.nvmlDeviceGetIndex(by_uuid) == index
        serial = pynvml.nvmlDeviceGetSerial(handle)
        assert serial.isdigit()
        assert pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetHandleBySerial(serial)) == index
        pci = pynvml.nvmlDeviceGetPciInfo(handle)
        by_bus = pynvml.nvmlDeviceGetHandleByPciBusId(pci.busId)
        assert pynvml.nvmlDeviceGetIndex(by_bus) == index
        by_legacy = pynvml.nvmlDeviceGetHandleByPciBusId(pci.busIdLegacy)
        assert pynvml.nvmlDeviceGetIndex(by_legacy) == index
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetHandleByUUID("GPU-00000000-0000-0000-0000-000000000000")
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetHandleByPciBusId("00000000:01:00.0")


def test_lookup_by_versioned_uuid(sim: SimDir) -> None:
    uuid = pynvml.nvmlDeviceGetUUID(handles()[1])
    handle = pynvml.nvmlDeviceGetHandleByUUIDV(uuid, pynvml.NVML_UUID_TYPE_ASCII)
    assert pynvml.nvmlDeviceGetIndex(handle) == 1


def test_pci_info(sim: SimDir) -> None:
    pci = pynvml.nvmlDeviceGetPciInfo(handles()[0])
    assert pci.busId == "00000000:18:00.0"
    assert pci.busIdLegacy == "0000:18:00.0"
    assert (pci.domain, pci.bus, pci.device) == (0, 0x18, 0)
    assert pci.pciDeviceId & 0xFFFF == 0x10DE  # NVIDIA's vendor id in the low half
    ext = pynvml.nvmlPciInfoExt_v1_t()
    ext.version = pynvml.nvmlPciInfoExt_v1
    pynvml.nvmlDeviceGetPciInfoExt(handles()[0], ctypes.byref(ext))
    assert ext.busId == "00000000:18:00.0"
    assert (ext.baseClass, ext.subClass) == (3, 2)


@pytest.mark.parametrize(
    ("index", "mib"), [(0, 81559), (1, 40960), (2, 81920)], ids=["H100", "A100-40", "A100-80"]
)
def test_memory_info_v1_and_v2(sim: SimDir, index: int, mib: int) -> None:
    handle = handles()[index]
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    assert (memory.total, memory.used, memory.free) == (mib << 20, 0, mib << 20)
    memory2 = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
    assert (memory2.total, memory2.reserved, memory2.used, memory2.free) == (
        mib << 20,
        0,
        0,
        mib << 20,
    )
    with pytest.raises(pynvml.NVMLError_ArgumentVersionMismatch):
        pynvml.nvmlDeviceGetMemoryInfo(handle, version=0x01000028)


def test_buffers_too_small_are_insufficient_size(sim: SimDir, nvml_library: ctypes.CDLL) -> None:
    handle = handles()[0]
    small = ctypes.create_string_buffer(8)
    assert nvml_library.nvmlDeviceGetName(handle, small, 8) == pynvml.NVML_ERROR_INSUFFICIENT_SIZE
    assert nvml_library.nvmlDeviceGetUUID(handle, small, 8) == pynvml.NVML_ERROR_INSUFFICIENT_SIZE


@pytest.fixture
def sleeper() -> Any:
    process = subprocess.Popen(["sleep", "60"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_processes_are_reported_while_alive(sim: SimDir, sleeper: Any) -> None:
    gpu0 = handles()[0]
    assert pynvml.nvmlDeviceGetComputeRunningProcesses(gpu0) == []
    sim.add_process(sleeper.pid, 0, -1, -1, 5 << 30)
    sim.add_process(dead_pid(), 0, -1, -1, 7 << 30)  # exited: must be ignored
    processes = pynvml.nvmlDeviceGetComputeRunningProcesses(gpu0)
    assert [(p.pid, p.usedGpuMemory) for p in processes] == [(sleeper.pid, 5 << 30)]
    assert (processes[0].gpuInstanceId, processes[0].computeInstanceId) == (
        0xFFFFFFFF,
        0xFFFFFFFF,
    )
    assert [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses_v2(gpu0)] == [sleeper.pid]
    assert pynvml.nvmlDeviceGetComputeRunningProcesses(handles()[1]) == []
    assert pynvml.nvmlDeviceGetGraphicsRunningProcesses(gpu0) == []
    assert pynvml.nvmlDeviceGetGraphicsRunningProcesses_v2(gpu0) == []
    assert pynvml.nvmlDeviceGetMPSComputeRunningProcesses(gpu0) == []
    assert pynvml.nvmlDeviceGetMemoryInfo(gpu0).used == 5 << 30
    sleeper.kill()
    sleeper.wait()
    assert pynvml.nvmlDeviceGetComputeRunningProcesses(gpu0) == []
    assert pynvml.nvmlDeviceGetMemoryInfo(gpu0).used == 0


def test_a_killed_but_unreaped_process_is_not_reported(sim: SimDir, sleeper: Any) -> None:
    gpu0 = handles()[0]
    sim.add_process(sleeper.pid, 0, -1, -1, 1 << 20)
    assert [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(gpu0)] == [sleeper.pid]
    sleeper.kill()
    # Until waited for, the pid is a zombie: it exists, but holds no GPU context any more.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state = Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            break
        time.sleep(0.01)
    assert state == "Z"
    assert pynvml.nvmlDeviceGetComputeRunningProcesses(gpu0) == []
    sleeper.wait()


def test_process_count_protocol(sim: SimDir, sleeper: Any, nvml_library: ctypes.CDLL) -> None:
    sim.add_process(sleeper.pid, 0, -1, -1)
    sim.add_process(1, 0, -1, -1)  # init: always alive
    handle = handles()[0]
    count = ctypes.c_uint(0)
    ret = nvml_library.nvmlDeviceGetComputeRunningProcesses_v3(handle, ctypes.byref(count), None)
    assert (ret, count.value) == (pynvml.NVML_ERROR_INSUFFICIENT_SIZE, 2)
    infos = (pynvml.c_nvmlProcessInfo_v3_t * 1)()
    count.value = 1
    ret = nvml_library.nvmlDeviceGetComputeRunningProcesses_v3(handle, ctypes.byref(count), infos)
    assert (ret, count.value) == (pynvml.NVML_ERROR_INSUFFICIENT_SIZE, 2)


def test_health_defaults_are_nominal(sim: SimDir) -> None:
    handle = handles()[0]
    assert pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU) == 35
    assert pynvml.nvmlDeviceGetTemperatureV(handle, pynvml.NVML_TEMPERATURE_GPU) == 35
    assert pynvml.nvmlDeviceGetPowerUsage(handle) == 70000
    for error_type in (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, 1):
        for counter in (pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC):
            assert pynvml.nvmlDeviceGetTotalEccErrors(handle, error_type, counter) == 0
    assert pynvml.nvmlDeviceGetRemappedRows(handle) == (0, 0, 0, 0)
    assert pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle) == 0
    assert pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle) == 0
    assert pynvml.nvmlDeviceGetSupportedClocksEventReasons(handle) != 0
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_COUNT)


def test_health_overrides_per_gpu(sim: SimDir) -> None:
    (sim.path / "health").write_text(
        "# injected faults\n"
        "1 temperature_c 91\n"
        "1 power_mw 412000\n"
        "1 ecc_volatile_corrected 3\n"
        "1 ecc_volatile_uncorrected 1\n"
        "1 ecc_aggregate_corrected 40\n"
        "1 ecc_aggregate_uncorrected 2\n"
        "1 remapped_correctable 5\n"
        "1 remapped_uncorrectable 6\n"
        "1 remapping_pending 1\n"
        "1 remapping_failure 1\n"
        "1 clocks_event_reasons 72\n"
        "1 temperature_c not-a-number\n"
    )
    gpu0, gpu1 = handles()[:2]
    assert pynvml.nvmlDeviceGetTemperature(gpu0, 0) == 35
    assert pynvml.nvmlDeviceGetTemperature(gpu1, 0) == 91
    assert pynvml.nvmlDeviceGetPowerUsage(gpu1) == 412000
    ecc = pynvml.nvmlDeviceGetTotalEccErrors
    assert ecc(gpu1, 0, pynvml.NVML_VOLATILE_ECC) == 3
    assert ecc(gpu1, 1, pynvml.NVML_VOLATILE_ECC) == 1
    assert ecc(gpu1, 0, pynvml.NVML_AGGREGATE_ECC) == 40
    assert ecc(gpu1, 1, pynvml.NVML_AGGREGATE_ECC) == 2
    assert pynvml.nvmlDeviceGetRemappedRows(gpu1) == (5, 6, 1, 1)
    assert pynvml.nvmlDeviceGetCurrentClocksEventReasons(gpu1) == 72
    assert pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(gpu1) == 72
