"""MIG mode, GPU and compute instances, MIG device handles, and DIR/counters."""

from __future__ import annotations

import ctypes
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pynvml
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.nvmlsim.simdir import SimDir

ENABLE, DISABLE = pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_DISABLE
MIG_UUID = re.compile(r"MIG-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# profile id -> (compute slices, memory slices, max instances, starts); the MIG user guide.
PROFILES = {
    19: (1, 1, 7, (0, 1, 2, 3, 4, 5, 6)),
    20: (1, 1, 1, (0, 1, 2, 3, 4, 5, 6)),
    15: (1, 2, 4, (0, 2, 4, 6)),
    14: (2, 2, 3, (0, 2, 4)),
    9: (3, 4, 2, (0, 4)),
    5: (4, 4, 1, (0,)),
    0: (7, 8, 1, (0,)),
}


def gi_id(profile_id: int, start: int) -> int:
    """The GI id a real A100/H100 assigns to a placement."""
    if profile_id == 0:
        return 0
    if profile_id == 5:
        return 1
    if profile_id == 9:
        return 1 if start == 0 else 2
    if profile_id in (14, 15):
        return 3 + start // 2
    return 7 + start


def gpu(index: int = 0) -> Any:
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def place(handle: Any, profile_id: int, start: int, size: int | None = None) -> Any:
    placement = pynvml.c_nvmlGpuInstancePlacement_t()
    placement.start = start
    placement.size = PROFILES[profile_id][1] if size is None else size
    return pynvml.nvmlDeviceCreateGpuInstanceWithPlacement(
        handle, profile_id, ctypes.byref(placement)
    )


def place_ci(gi: Any, profile_id: int, start: int, size: int) -> Any:
    placement = pynvml.c_nvmlComputeInstancePlacement_t()
    placement.start = start
    placement.size = size
    return pynvml.nvmlGpuInstanceCreateComputeInstanceWithPlacement(
        gi, profile_id, ctypes.byref(placement)
    )


def instances(handle: Any) -> list[tuple[int, int, int, int]]:
    """(GI id, profile id, start, size) of every GPU instance, by id."""
    found = []
    for profile_id in PROFILES:
        array = (pynvml.c_nvmlGpuInstance_t * 8)()
        count = ctypes.c_uint(0)
        pynvml.nvmlDeviceGetGpuInstances(handle, profile_id, array, ctypes.byref(count))
        for i in range(count.value):
            info = pynvml.nvmlGpuInstanceGetInfo(array[i])
            found.append((info.id, info.profileId, info.placement.start, info.placement.size))
    return sorted(found)


def compute_instances(gi: Any) -> list[tuple[int, int, int, int]]:
    """(CI id, profile id, start, size) of every compute instance in a GI."""
    found = []
    for profile_id in range(5):
        array = (pynvml.c_nvmlComputeInstance_t * 8)()
        count = ctypes.c_uint(0)
        try:
            pynvml.nvmlGpuInstanceGetComputeInstances(gi, profile_id, array, ctypes.byref(count))
        except pynvml.NVMLError_NotSupported:
            continue
        for i in range(count.value):
            info = pynvml.nvmlComputeInstanceGetInfo(array[i])
            found.append((info.id, info.profileId, info.placement.start, info.placement.size))
    return sorted(found)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "60"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


# ---- MIG mode ---------------------------------------------------------------------------------


def test_mig_mode_is_pending_until_reset(sim: SimDir) -> None:
    a100_80 = gpu(2)
    assert pynvml.nvmlDeviceGetMigMode(a100_80) == [0, 0]
    assert pynvml.nvmlDeviceGetMaxMigDeviceCount(a100_80) == 0
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceCreateGpuInstance(a100_80, 9)
    assert pynvml.nvmlDeviceSetMigMode(a100_80, ENABLE) == pynvml.NVML_ERROR_RESET_REQUIRED
    assert pynvml.nvmlDeviceGetMigMode(a100_80) == [0, 1]
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceCreateGpuInstance(a100_80, 9)
    # Asking for the current mode cancels the pending change without a reset.
    assert pynvml.nvmlDeviceSetMigMode(a100_80, DISABLE) == pynvml.NVML_SUCCESS
    assert pynvml.nvmlDeviceGetMigMode(a100_80) == [0, 0]
    assert pynvml.nvmlDeviceSetMigMode(a100_80, ENABLE) == pynvml.NVML_ERROR_RESET_REQUIRED
    assert sim.reset_gpu(2) == pynvml.NVML_SUCCESS
    assert pynvml.nvmlDeviceGetMigMode(a100_80) == [1, 1]
    assert pynvml.nvmlDeviceGetMaxMigDeviceCount(a100_80) == 7
    pynvml.nvmlDeviceCreateGpuInstance(a100_80, 9)


def test_disabling_mig_with_instances_is_in_use(sim: SimDir) -> None:
    gi = pynvml.nvmlDeviceCreateGpuInstance(gpu(), 19)
    with pytest.raises(pynvml.NVMLError_InUse):
        pynvml.nvmlDeviceSetMigMode(gpu(), DISABLE)
    assert pynvml.nvmlDeviceGetMigMode(gpu()) == [1, 1]
    pynvml.nvmlGpuInstanceDestroy(gi)
    assert pynvml.nvmlDeviceSetMigMode(gpu(), DISABLE) == pynvml.NVML_ERROR_RESET_REQUIRED
    assert pynvml.nvmlDeviceGetMigMode(gpu()) == [1, 0]
    assert sim.reset_gpu(0) == pynvml.NVML_SUCCESS
    assert pynvml.nvmlDeviceGetMigMode(gpu()) == [0, 0]
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetGpuInstanceById(gpu(), 7)


def test_set_mig_mode_rejects_a_bad_mode_and_a_mig_handle(sim: SimDir) -> None:
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceSetMigMode(gpu(), 2)
    gi = pynvml.nvmlDeviceCreateGpuInstance(gpu(), 19)
    pynvml.nvmlGpuInstanceCreateComputeInstance(gi, 0)
    mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu(), 0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetMigMode(mig)


def test_reset_destroys_instances_and_refuses_while_processes_run(
    sim: SimDir, sleeper: subprocess.Popen[bytes]
) -> None:
    gi = pynvml.nvmlDeviceCreateGpuInstance(gpu(), 9)
    pynvml.nvmlGpuInstanceCreateComputeInstance(gi, 2)
    sim.add_process(sleeper.pid, 0, 1, 0)
    assert sim.reset_gpu(0) == pynvml.NVML_ERROR_IN_USE
    assert instances(gpu()) == [(1, 9, 0, 4)]
    sleeper.kill()
    sleeper.wait()
    assert sim.reset_gpu(0) == pynvml.NVML_SUCCESS
    assert instances(gpu()) == []
    assert sim.reset_gpu(3) == pynvml.NVML_ERROR_INVALID_ARGUMENT
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlGpuInstanceGetInfo(gi)


# ---- GPU instances ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile_id", "start"),
    [(p, s) for p, (_, _, _, starts) in PROFILES.items() for s in starts],
)
def test_gi_id_and_placement_follow_the_profile(sim: SimDir, profile_id: int, start: int) -> None:
    gi = place(gpu(), profile_id, start)
    info = pynvml.nvmlGpuInstanceGetInfo(gi)
    assert (info.id, info.profileId, info.placement.start, info.placement.size) == (
        gi_id(profile_id, start),
        profile_id,
        start,
        PROFILES[profile_id][1],
    )
    assert pynvml.nvmlDeviceGetIndex(info.device) == 0
    same = pynvml.nvmlDeviceGetGpuInstanceById(gpu(), info.id)
    assert pynvml.nvmlGpuInstanceGetInfo(same).placement.start == start


def test_create_without_placement_takes_the_lowest_free_start(sim: SimDir) -> None:
    place(gpu(), 14, 0)
    starts = [
        pynvml.nvmlGpuInstanceGetInfo(pynvml.nvmlDeviceCreateGpuInstance(gpu(), 19)).placement.start
        for _ in range(5)
    ]
    assert starts == [2, 3, 4, 5, 6]
    with pytest.raises(pynvml.NVMLError_InsufficientResources):
        pynvml.nvmlDeviceCreateGpuInstance(gpu(), 19)


@pytest.mark.parametrize(
    ("profile_id", "start", "size"),
    [(9, 2, 4), (19, 7, 1), (14, 1, 2), (15, 1, 2), (0, 1, 8), (9, 0, 2), (19, 0, 0), (5, 9, 4)],
)
def test_placement_outside_the_profile_is_invalid_argument(
    sim: SimDir, profile_id: int, start: int, size: int
) -> None:
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        place(gpu(), profile_id, start, size)
    assert instances(gpu()) == []


def test_unknown_profile_id_is_invalid_argument(sim: SimDir) -> None:
    for profile_id in (1, 2, 21, 0xFFFFFFFF):
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            pynvml.nvmlDeviceCreateGpuInstance(gpu(), profile_id)


def test_overlap_is_insufficient_resources(sim: SimDir) -> None:
    place(gpu(), 9, 0)  # memory slices 0-3
    for profile_id, start in [(14, 2), (19, 3), (15, 2), (5, 0), (0, 0), (9, 0)]:
        with pytest.raises(pynvml.NVMLError_InsufficientResources):
            place(gpu(), profile_id, start)
    place(gpu(), 14, 4)
    place(gpu(), 15, 6)
    assert instances(gpu()) == [(1, 9, 0, 4), (5, 14, 4, 2), (6, 15, 6, 2)]


def test_media_extension_profile_allows_one_instance(sim: SimDir) -> None:
    place(gpu(), 20, 0)
    assert pynvml.nvmlDeviceGetGpuInstanceRemainingCapacity(gpu(), 20) == 0
    with pytest.raises(pynvml.NVMLError_InsufficientResources):
        place(gpu(), 20, 3)  # free memory, but the instance count is used up
    with pytest.raises(pynvml.NVMLError_InsufficientResources):
        pynvml.nvmlDeviceCreateGpuInstance(gpu(), 20)
    place(gpu(), 19, 3)


def test_full_gpu_leaves_no_capacity(sim: SimDir) -> None:
    for start in (0, 2, 4):
        place(gpu(), 14, start)
    place(gpu(), 19, 6)  # seven compute slices in use; memory slice 7 is free
    for profile_id in PROFILES:
        assert pynvml.nvmlDeviceGetGpuInstanceRemainingCapacity(gpu(), profile_id) == 0
    with pytest.raises(pynvml.NVMLError_InsufficientResources):
        pynvml.nvmlDeviceCreateGpuInstance(gpu(), 15)


def test_remaining_capacity_after_a_3g(sim: SimDir) -> None:
    place(gpu(), 9, 0)
    capacity = {p: pynvml.nvmlDeviceGetGpuInstanceRemainingCapacity(gpu(), p) for p in PROFILES}
    assert capacity == {19: 3, 20: 1, 15: 2, 14: 1, 9: 1, 5: 0, 0: 0}


def test_gpu_instance_lookup_errors(sim: SimDir) -> None:
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetGpuInstanceById(gpu(), 1)
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetGpuInstanceById(gpu(), 99)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceGetGpuInstances(gpu(), 3, None, ctypes.byref(ctypes.c_uint()))


def test_destroyed_and_recreated_instances_leave_stale_handles(sim: SimDir) -> None:
    old = place(gpu(), 9, 4)
    pynvml.nvmlGpuInstanceDestroy(old)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlGpuInstanceGetInfo(old)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlGpuInstanceDestroy(old)
    new = place(gpu(), 9, 4)  # same GI id 2, a new incarnation
    assert pynvml.nvmlGpuInstanceGetInfo(new).id == 2
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlGpuInstanceGetInfo(old)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlGpuInstanceCreateComputeInstance(old, 0)


def test_destroying_a_gi_with_compute_instances_is_in_use(sim: SimDir) -> None:
    gi = place(gpu(), 9, 0)
    ci = pynvml.nvmlGpuInstanceCreateComputeInstance(gi, 2)
    with pytest.raises(pynvml.NVMLError_InUse):
        pynvml.nvmlGpuInstanceDestroy(gi)
    pynvml.nvmlComputeInstanceDestroy(ci)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlComputeInstanceDestroy(ci)
    pynvml.nvmlGpuInstanceDestroy(gi)
    assert instances(gpu()) == []


def test_live_processes_block_destroy_dead_ones_do_not(
    sim: SimDir, sleeper: subprocess.Popen[bytes]
) -> None:
    gi = place(gpu(), 9, 4)
    ci = pynvml.nvmlGpuInstanceCreateComputeInstance(gi, 2)
    sim.add_process(sleeper.pid, 0, 2, 0, 3 << 30)
    with pytest.raises(pynvml.NVMLError_InUse):
        pynvml.nvmlComputeInstanceDestroy(ci)
    mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu(), 0)
    assert [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(mig)] == [sleeper.pid]
    assert pynvml.nvmlDeviceGetMemoryInfo(mig).used == 3 << 30
    parent = pynvml.nvmlDeviceGetComputeRunningProcesses(gpu())
    assert [(p.pid, p.gpuInstanceId, p.computeInstanceId) for p in parent] == [(sleeper.pid, 2, 0)]
    sleeper.kill()
    sleeper.wait()  # the line stays in DIR/processes, but the pid is gone
    pynvml.nvmlComputeInstanceDestroy(ci)
    pynvml.nvmlGpuInstanceDestroy(gi)


def test_a_process_on_a_gpu_instance_blocks_its_destroy(
    sim: SimDir, sleeper: subprocess.Popen[bytes]
) -> None:
    gi = place(gpu(), 19, 5)
    sim.add_process(sleeper.pid, 0, 12, 0)
    with pytest.raises(pynvml.NVMLError_InUse):
        pynvml.nvmlGpuInstanceDestroy(gi)
    sim.remove_process(sleeper.pid)
    pynvml.nvmlGpuInstanceDestroy(gi)


# ---- compute instances ------------------------------------------------------------------------


def test_compute_instances_fill_their_gpu_instance(sim: SimDir) -> None:
    gi = place(gpu(), 0, 0)  # 7 compute slices
    place_ci(gi, 2, 4, 3)  # slices 4-6
    with pytest.raises(pynvml.NVMLError_InsufficientResources):
        place_ci(gi, 1, 4, 2)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        place_ci(gi, 1, 1, 2)  # 2-slice CIs start at 0, 2, 4
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        place_ci(gi, 1, 0, 3)
    assert pynvml.nvmlGpuInstanceGetComputeInstanceRemainingCapacity(gi, 0) == 4
    assert pynvml.nvmlGpuInstanceGetComputeInstanceRemainingCapacity(gi, 4) == 0
    ids = [pynvml.nvmlComputeInstanceGetInfo(pynvml.nvmlGpuInstanceCreateComputeInstance(gi, 0)).id
           for _ in range(4)]  # fmt: skip
    assert ids == [1, 2, 3, 4]
    with pytest.raises(pynvml.NVMLError_InsufficientResources):
        pynvml.nvmlGpuInstanceCreateComputeInstance(gi, 0)
    assert compute_instances(gi) == [(0, 2, 4, 3), (1, 0, 0, 1), (2, 0, 1, 1), (3, 0, 2, 1),
                                     (4, 0, 3, 1)]  # fmt: skip
    # The lowest free CI id is reused.
    pynvml.nvmlComputeInstanceDestroy(pynvml.nvmlGpuInstanceGetComputeInstanceById(gi, 2))
    pynvml.nvmlComputeInstanceDestroy(pynvml.nvmlGpuInstanceGetComputeInstanceById(gi, 0))
    again = pynvml.nvmlGpuInstanceCreateComputeInstance(gi, 1)
    info = pynvml.nvmlComputeInstanceGetInfo(again)
    assert (info.id, info.placement.start, info.placement.size) == (0, 4, 2)
    assert pynvml.nvmlGpuInstanceGetInfo(info.gpuInstance).id == 0
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlGpuInstanceGetComputeInstanceById(gi, 2)


def test_compute_instance_profiles_a_gi_lacks(sim: SimDir) -> None:
    gi = place(gpu(), 5, 0)  # 4g: CIs of 1, 2 and 4 slices, no 3-slice one
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlGpuInstanceCreateComputeInstance(gi, 2)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlGpuInstanceCreateComputeInstance(gi, 4)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlGpuInstanceCreateComputeInstance(gi, 9)
    pynvml.nvmlGpuInstanceCreateComputeInstance(gi, 3)


# ---- MIG devices ------------------------------------------------------------------------------


def test_mig_device_handles(sim: SimDir) -> None:
    gi_a = place(gpu(), 9, 4)
    ci_a = pynvml.nvmlGpuInstanceCreateComputeInstance(gi_a, 2)
    gi_b = place(gpu(), 19, 0)
    pynvml.nvmlGpuInstanceCreateComputeInstance(gi_b, 0)
    place(gpu(), 19, 1)  # a GI without a CI is no MIG device
    assert pynvml.nvmlDeviceGetMaxMigDeviceCount(gpu()) == 7
    devices = [pynvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu(), i) for i in range(2)]
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu(), 2)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu(), 7)
    ids = [
        (pynvml.nvmlDeviceGetGpuInstanceId(d), pynvml.nvmlDeviceGetComputeInstanceId(d))
        for d in devices
    ]
    assert ids == [(2, 0), (7, 0)]  # ordered by GI id
    mig = devices[0]
    assert pynvml.nvmlDeviceIsMigDeviceHandle(mig).value == 1
    assert pynvml.nvmlDeviceIsMigDeviceHandle(gpu()).value == 0
    parent = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig)
    assert pynvml.nvmlDeviceGetIndex(parent) == 0
    assert pynvml.nvmlDeviceGetName(mig) == "NVIDIA H100 80GB HBM3 MIG 3g.40gb"
    assert pynvml.nvmlDeviceGetMemoryInfo(mig).total == 40448 << 20
    attributes = pynvml.nvmlDeviceGetAttributes(mig)
    assert (attributes.gpuInstanceSliceCount, attributes.computeInstanceSliceCount) == (3, 3)
    assert attributes.memorySizeMB == 40448
    uuid = pynvml.nvmlDeviceGetUUID(mig)
    assert MIG_UUID.fullmatch(uuid)
    assert uuid != pynvml.nvmlDeviceGetUUID(devices[1])
    by_uuid = pynvml.nvmlDeviceGetHandleByUUID(uuid)
    assert pynvml.nvmlDeviceGetGpuInstanceId(by_uuid) == 2
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetGpuInstanceId(gpu())
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(gpu())
    # Destroyed, the MIG device handle is stale; re-created, it is a new device with a new UUID.
    pynvml.nvmlComputeInstanceDestroy(ci_a)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceGetUUID(mig)
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetHandleByUUID(uuid)
    pynvml.nvmlGpuInstanceCreateComputeInstance(gi_a, 2)
    again = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu(), 0)
    assert pynvml.nvmlDeviceGetComputeInstanceId(again) == 0
    assert pynvml.nvmlDeviceGetUUID(again) != uuid


def test_a_smaller_compute_instance_names_its_mig_device(sim: SimDir) -> None:
    gi = place(pynvml.nvmlDeviceGetHandleByIndex(1), 9, 0)  # A100-40GB 3g.20gb
    place_ci(gi, 0, 2, 1)
    mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(pynvml.nvmlDeviceGetHandleByIndex(1), 0)
    assert pynvml.nvmlDeviceGetName(mig) == "NVIDIA A100-SXM4-40GB MIG 1c.3g.20gb"
    # A compute instance shares its GPU instance's memory.
    assert pynvml.nvmlDeviceGetMemoryInfo(mig).total == 19968 << 20


# ---- counters ---------------------------------------------------------------------------------


def test_every_mutating_call_counts_once_success_or_not(sim: SimDir) -> None:
    start = sim.counter()
    gi = pynvml.nvmlDeviceCreateGpuInstance(gpu(), 9)
    ci = pynvml.nvmlGpuInstanceCreateComputeInstance(gi, 2)
    assert sim.counter() == start + 2
    with pytest.raises(pynvml.NVMLError_InsufficientResources):
        place(gpu(), 9, 0)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        place(gpu(), 9, 1)
    with pytest.raises(pynvml.NVMLError_InsufficientResources):
        pynvml.nvmlGpuInstanceCreateComputeInstance(gi, 0)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        place_ci(gi, 0, 5, 1)
    with pytest.raises(pynvml.NVMLError_InUse):
        pynvml.nvmlGpuInstanceDestroy(gi)
    assert sim.counter() == start + 7
    pynvml.nvmlDeviceSetMigMode(gpu(), ENABLE)  # already enabled: still an attempt
    assert sim.counter() == start + 8
    # Reading everything back changes nothing.
    instances(gpu())
    compute_instances(gi)
    pynvml.nvmlDeviceGetMigMode(gpu())
    pynvml.nvmlDeviceGetGpuInstanceRemainingCapacity(gpu(), 19)
    pynvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu(), 0)
    assert sim.counter() == start + 8
    pynvml.nvmlComputeInstanceDestroy(ci)
    pynvml.nvmlGpuInstanceDestroy(gi)
    assert sim.counter() == start + 10
    assert sim.reset_gpu(0) == 0  # sim-only, not an NVML mutation
    assert sim.counter() == start + 10


# ---- capacity rules against an independent model ----------------------------------------------


class ReferenceGpu:
    """The MIG user guide's rules, written plainly: no shared memory slice, at most seven
    compute slices, at most `max instances` per profile."""

    def __init__(self) -> None:
        self.instances: dict[int, tuple[int, int]] = {}  # GI id -> (profile id, start)

    def _fits(self, profile_id: int, start: int) -> bool:
        compute, memory, max_instances, _ = PROFILES[profile_id]
        used = {
            s for p, begin in self.instances.values() for s in range(begin, begin + PROFILES[p][1])
        }
        compute_used = sum(PROFILES[p][0] for p, _ in self.instances.values())
        count = sum(1 for p, _ in self.instances.values() if p == profile_id)
        return (
            not used & set(range(start, start + memory))
            and compute_used + compute <= 7
            and count < max_instances
        )

    def create(self, profile_id: int, start: int | None) -> int | None:
        starts = PROFILES[profile_id][3]
        if start is not None:
            if start not in starts:
                return int(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            candidates: tuple[int, ...] = (start,)
        else:
            candidates = starts
        for candidate in candidates:
            if self._fits(profile_id, candidate):
                self.instances[gi_id(profile_id, candidate)] = (profile_id, candidate)
                return None
        return int(pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES)

    def capacity(self, profile_id: int) -> int:
        saved = dict(self.instances)
        count = 0
        while self.create(profile_id, None) is None:
            count += 1
        self.instances = saved
        return count


operation = st.one_of(
    st.tuples(st.just("create"), st.sampled_from(sorted(PROFILES)), st.none()),
    st.tuples(st.just("create"), st.sampled_from(sorted(PROFILES)), st.integers(0, 7)),
    st.tuples(st.just("destroy"), st.integers(0, 13), st.none()),
)


# One GPU reset per example puts the node back to empty, so the function-scoped fixture is safe.
@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(operations=st.lists(operation, max_size=14))
def test_creation_and_capacity_agree_with_the_rules(
    sim: SimDir, operations: list[tuple[str, int, int | None]]
) -> None:
    assert sim.reset_gpu(0) == pynvml.NVML_SUCCESS
    handle = gpu()
    reference = ReferenceGpu()
    for kind, value, start in operations:
        if kind == "destroy":
            if value in reference.instances:
                del reference.instances[value]
                pynvml.nvmlGpuInstanceDestroy(pynvml.nvmlDeviceGetGpuInstanceById(handle, value))
            else:
                with pytest.raises(pynvml.NVMLError_NotFound):
                    pynvml.nvmlDeviceGetGpuInstanceById(handle, value)
            continue
        expected = reference.create(value, start)
        try:
            if start is None:
                pynvml.nvmlDeviceCreateGpuInstance(handle, value)
            else:
                place(handle, value, start)
            got = None
        except pynvml.NVMLError as error:
            got = error.value
        assert got == expected
    assert instances(handle) == sorted(
        (gi, p, s, PROFILES[p][1]) for gi, (p, s) in reference.instances.items()
    )
    for profile_id in PROFILES:
        assert pynvml.nvmlDeviceGetGpuInstanceRemainingCapacity(handle, profile_id) == (
            reference.capacity(profile_id)
        )
