"""A GPU that fell off the bus (`<gpu> lost 1` in DIR/health), and the retired-pages queries.

nvml.h lists NVML_ERROR_GPU_IS_LOST for the handle lookups, the per-device queries and
nvmlEventSetWait; nvidia-smi's "Unable to determine the device handle for GPU <bus id>: GPU is
lost" is the lookup by index failing while the GPU still counts.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from typing import Any

import pynvml
import pytest

from tests.nvmlsim.simdir import SimDir

XID = pynvml.nvmlEventTypeXidCriticalError
Lost = pynvml.NVMLError_GpuIsLost


def address(handle: Any) -> int | None:
    return ctypes.cast(handle, ctypes.c_void_p).value


@pytest.fixture
def event_set(sim: SimDir) -> Iterator[Any]:
    created = pynvml.nvmlEventSetCreate()
    try:
        yield created
    finally:
        pynvml.nvmlEventSetFree(created)


def per_device_calls(handle: Any) -> list[Callable[[], Any]]:
    return [
        lambda: pynvml.nvmlDeviceGetName(handle),
        lambda: pynvml.nvmlDeviceGetUUID(handle),
        lambda: pynvml.nvmlDeviceGetIndex(handle),
        lambda: pynvml.nvmlDeviceGetSerial(handle),
        lambda: pynvml.nvmlDeviceGetMinorNumber(handle),
        lambda: pynvml.nvmlDeviceGetPciInfo(handle),
        lambda: pynvml.nvmlDeviceGetMemoryInfo(handle),
        lambda: pynvml.nvmlDeviceGetArchitecture(handle),
        lambda: pynvml.nvmlDeviceGetComputeRunningProcesses(handle),
        lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        lambda: pynvml.nvmlDeviceGetPowerUsage(handle),
        lambda: pynvml.nvmlDeviceGetTotalEccErrors(handle, 1, pynvml.NVML_VOLATILE_ECC),
        lambda: pynvml.nvmlDeviceGetRemappedRows(handle),
        lambda: pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle),
        lambda: pynvml.nvmlDeviceGetMigMode(handle),
        lambda: pynvml.nvmlDeviceGetSupportedEventTypes(handle),
        lambda: pynvml.nvmlDeviceGetRetiredPagesPendingStatus(handle),
    ]


def test_every_call_on_a_lost_gpu_fails_and_it_recovers(sim: SimDir) -> None:
    gpu0, gpu1 = (pynvml.nvmlDeviceGetHandleByIndex(i) for i in (0, 1))
    uuid, serial = pynvml.nvmlDeviceGetUUID(gpu1), pynvml.nvmlDeviceGetSerial(gpu1)
    bus_id = pynvml.nvmlDeviceGetPciInfo(gpu1).busId
    sim.append_health("1 temperature_c 80")
    sim.append_health("1 lost 1")

    assert pynvml.nvmlDeviceGetCount() == 3  # still enumerated, as by the driver
    for lookup in (
        lambda: pynvml.nvmlDeviceGetHandleByIndex(1),
        lambda: pynvml.nvmlDeviceGetHandleByUUID(uuid),
        lambda: pynvml.nvmlDeviceGetHandleBySerial(serial),
        lambda: pynvml.nvmlDeviceGetHandleByPciBusId(bus_id),
    ):
        with pytest.raises(Lost):
            lookup()
    for call in per_device_calls(gpu1):
        with pytest.raises(Lost):
            call()
    # The other GPUs are untouched.
    assert pynvml.nvmlDeviceGetName(gpu0) == "NVIDIA H100 80GB HBM3"
    assert address(pynvml.nvmlDeviceGetHandleByIndex(0)) == address(gpu0)

    sim.append_health("1 lost 0")  # the last line wins: back on the bus
    assert address(pynvml.nvmlDeviceGetHandleByIndex(1)) == address(gpu1)
    assert pynvml.nvmlDeviceGetTemperature(gpu1, pynvml.NVML_TEMPERATURE_GPU) == 80
    for call in per_device_calls(gpu1)[:-1]:
        call()


def test_lost_is_a_flag_other_values_are_skipped(sim: SimDir) -> None:
    sim.append_health("0 lost 2")
    sim.append_health("0 lost yes")
    assert pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetHandleByIndex(0)) == 0
    sim.append_health("0 lost 1")
    sim.append_health("0 lost 7")  # skipped: the 1 above still holds
    with pytest.raises(Lost):
        pynvml.nvmlDeviceGetHandleByIndex(0)


def test_mig_devices_and_instances_of_a_lost_gpu_fail_and_survive(sim: SimDir) -> None:
    gpu = pynvml.nvmlDeviceGetHandleByIndex(0)
    gi = pynvml.nvmlDeviceCreateGpuInstance(gpu, 9)  # 3g.40gb
    ci = pynvml.nvmlGpuInstanceCreateComputeInstance(gi, 2)  # spanning it
    mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, 0)
    mig_uuid = pynvml.nvmlDeviceGetUUID(mig)
    counter = sim.counter()
    sim.append_health("0 lost 1")

    for call in (
        lambda: pynvml.nvmlDeviceGetUUID(mig),
        lambda: pynvml.nvmlDeviceGetMemoryInfo(mig),
        lambda: pynvml.nvmlDeviceGetHandleByUUID(mig_uuid),
        lambda: pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig),
        lambda: pynvml.nvmlGpuInstanceGetInfo(gi),
        lambda: pynvml.nvmlComputeInstanceGetInfo(ci),
        lambda: pynvml.nvmlGpuInstanceGetComputeInstanceRemainingCapacity(gi, 0),
        lambda: pynvml.nvmlComputeInstanceDestroy(ci),
        lambda: pynvml.nvmlGpuInstanceDestroy(gi),
        lambda: pynvml.nvmlDeviceCreateGpuInstance(gpu, 9),
    ):
        with pytest.raises(Lost):
            call()
    assert sim.reset_gpu(0) == pynvml.NVML_ERROR_GPU_IS_LOST
    # The refused mutations were calls all the same.
    assert sim.counter() == counter + 3

    sim.append_health("0 lost 0")
    # Nothing was destroyed while the GPU was away.
    assert pynvml.nvmlDeviceGetUUID(mig) == mig_uuid
    assert pynvml.nvmlGpuInstanceGetInfo(gi).profileId == 9


def test_event_wait_delivers_what_is_pending_then_reports_the_lost_gpu(
    sim: SimDir, event_set: Any
) -> None:
    gpu0, gpu1 = (pynvml.nvmlDeviceGetHandleByIndex(i) for i in (0, 1))
    for handle in (gpu0, gpu1):
        pynvml.nvmlDeviceRegisterEvents(handle, XID, event_set)
    sim.append_health("0 lost 1")
    sim.append_xid("0 79")
    sim.append_xid("1 48")

    first = pynvml.nvmlEventSetWait_v2(event_set, 0)
    assert (address(first.device), first.eventData) == (address(gpu0), 79)
    second = pynvml.nvmlEventSetWait_v2(event_set, 0)
    assert (address(second.device), second.eventData) == (address(gpu1), 48)
    # Nothing left: the wait reports the lost GPU instead of waiting out its timeout.
    with pytest.raises(Lost):
        pynvml.nvmlEventSetWait_v2(event_set, 60_000)
    with pytest.raises(Lost):
        pynvml.nvmlEventSetWait(event_set, 0)
    sim.append_xid("1 31")  # a healthy GPU's events still arrive
    assert pynvml.nvmlEventSetWait_v2(event_set, 0).eventData == 31
    # A set without the lost GPU is not affected; registering the lost GPU fails.
    other = pynvml.nvmlEventSetCreate()
    try:
        pynvml.nvmlDeviceRegisterEvents(gpu1, XID, other)
        with pytest.raises(Lost):
            pynvml.nvmlDeviceRegisterEvents(gpu0, XID, other)
        with pytest.raises(pynvml.NVMLError_Timeout):
            pynvml.nvmlEventSetWait_v2(other, 0)
    finally:
        pynvml.nvmlEventSetFree(other)

    sim.append_health("0 lost 0")
    with pytest.raises(pynvml.NVMLError_Timeout):
        pynvml.nvmlEventSetWait_v2(event_set, 0)


def test_retired_pages_are_not_supported_on_ampere_and_hopper(sim: SimDir) -> None:
    causes = (
        pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
        pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR,
    )
    for index in range(3):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        for cause in causes:
            with pytest.raises(pynvml.NVMLError_NotSupported):
                pynvml.nvmlDeviceGetRetiredPages(handle, cause)
            with pytest.raises(pynvml.NVMLError_NotSupported):
                pynvml.nvmlDeviceGetRetiredPages_v2(handle, cause)
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlDeviceGetRetiredPagesPendingStatus(handle)
    handle = pynvml.nvmlDeviceGetHandleByIndex(2)
    count = ctypes.c_uint(0)
    retired_pages = sim.library.nvmlDeviceGetRetiredPages
    assert retired_pages(handle, 2, ctypes.byref(count), None) == (
        pynvml.NVML_ERROR_INVALID_ARGUMENT
    )
    assert retired_pages(handle, 0, None, None) == pynvml.NVML_ERROR_INVALID_ARGUMENT
    sim.append_health("2 lost 1")
    with pytest.raises(Lost):
        pynvml.nvmlDeviceGetRetiredPages(handle, causes[0])
