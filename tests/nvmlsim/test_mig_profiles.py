"""GPU-instance and compute-instance profiles and placements, on every simulated model.

The expected values are written out here from the NVIDIA MIG user guide (profile IDs, slices,
placements, instance counts), independently of the C tables.
"""

from __future__ import annotations

import ctypes
from typing import Any

import pynvml
import pytest

from agent.hw.mig.profiles import REFERENCE_GEOMETRIES
from tests.nvmlsim.simdir import SimDir

ALL_MIG = "gpu 0 H100-80GB mig=1\ngpu 1 A100-40GB mig=1\ngpu 2 A100-80GB mig=1\n"
MODELS = ["H100-80GB", "A100-40GB", "A100-80GB"]
MEMORY_MIB = {"H100-80GB": 81559, "A100-40GB": 40960, "A100-80GB": 81920}

# profile index -> (profile id, compute slices, memory slices, max instances, starts)
GI_PROFILES = {
    0: (19, 1, 1, 7, (0, 1, 2, 3, 4, 5, 6)),
    1: (14, 2, 2, 3, (0, 2, 4)),
    2: (9, 3, 4, 2, (0, 4)),
    3: (5, 4, 4, 1, (0,)),
    4: (0, 7, 8, 1, (0,)),
    7: (20, 1, 1, 1, (0, 1, 2, 3, 4, 5, 6)),
    9: (15, 1, 2, 4, (0, 2, 4, 6)),
}
NAMES_80GB = {
    0: "1g.10gb",
    7: "1g.10gb+me",
    9: "1g.20gb",
    1: "2g.20gb",
    2: "3g.40gb",
    3: "4g.40gb",
    4: "7g.80gb",
}
NAMES = {
    "H100-80GB": NAMES_80GB,
    "A100-80GB": NAMES_80GB,
    "A100-40GB": {
        0: "1g.5gb",
        7: "1g.5gb+me",
        9: "1g.10gb",
        1: "2g.10gb",
        2: "3g.20gb",
        3: "4g.20gb",
        4: "7g.40gb",
    },
}
# GI compute slices -> slice counts of the compute-instance profiles it offers
CI_SLICES = {7: [1, 2, 3, 4, 7], 4: [1, 2, 4], 3: [1, 2, 3], 2: [1, 2], 1: [1]}


def placements(handle: Any, profile_id: int) -> list[tuple[int, int]]:
    array = (pynvml.c_nvmlGpuInstancePlacement_t * 16)()
    count = ctypes.c_uint(16)
    pynvml.nvmlDeviceGetGpuInstancePossiblePlacements(
        handle, profile_id, array, ctypes.byref(count)
    )
    return [(array[i].start, array[i].size) for i in range(count.value)]


@pytest.fixture
def all_mig(make_sim: Any) -> SimDir:
    node: SimDir = make_sim(ALL_MIG)
    return node


@pytest.mark.parametrize("gpu", [0, 1, 2], ids=MODELS)
@pytest.mark.parametrize("index", sorted(GI_PROFILES))
def test_gi_profile_info_and_placements(all_mig: SimDir, gpu: int, index: int) -> None:
    model = MODELS[gpu]
    handle = pynvml.nvmlDeviceGetHandleByIndex(gpu)
    profile_id, compute, memory, max_instances, starts = GI_PROFILES[index]
    info = pynvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, index)
    assert info.version == pynvml.nvmlGpuInstanceProfileInfo_v2
    assert info.id == profile_id
    assert info.name == f"MIG {NAMES[model][index]}"
    assert (info.sliceCount, info.instanceCount, info.isP2pSupported) == (
        compute,
        max_instances,
        0,
    )
    # Memory: the profile's share of the GPU's eight memory slices, give or take the driver's
    # reservations (the user guide's sizes are a few percent under the fraction).
    share = MEMORY_MIB[model] * memory / 8
    assert 0.9 * share <= info.memorySizeMB <= share
    assert info.multiprocessorCount > 0
    assert info.copyEngineCount >= compute
    v1 = pynvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, index, version=1)
    assert (v1.id, v1.sliceCount, v1.instanceCount, v1.memorySizeMB) == (
        info.id,
        info.sliceCount,
        info.instanceCount,
        info.memorySizeMB,
    )
    by_id = pynvml.nvmlDeviceGetGpuInstanceProfileInfoById(handle, profile_id)
    assert (by_id.id, by_id.name) == (info.id, info.name)
    assert placements(handle, profile_id) == [(start, memory) for start in starts]
    assert pynvml.nvmlDeviceGetGpuInstanceRemainingCapacity(handle, profile_id) == max_instances


@pytest.mark.parametrize("index", [5, 6, 8, 10, 11, 12, 13, 14, 15, 16, 17])
def test_other_gi_profile_indices_are_not_supported(all_mig: SimDir, index: int) -> None:
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, index)


def test_gi_profile_index_out_of_range_and_unknown_id(all_mig: SimDir) -> None:
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceGetGpuInstanceProfileInfoById(handle, 1)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        placements(handle, 7)


def test_versioned_profile_info_rejects_an_unknown_version(
    all_mig: SimDir, nvml_library: ctypes.CDLL
) -> None:
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    info = pynvml.c_nvmlGpuInstanceProfileInfo_v2_t()
    info.version = 0x01000098
    ret = nvml_library.nvmlDeviceGetGpuInstanceProfileInfoV(handle, 2, ctypes.byref(info))
    assert ret == pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH


def test_profiles_without_mig_mode(make_sim: Any) -> None:
    make_sim("gpu 0 H100-80GB mig=0\n")
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, 0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetGpuInstanceRemainingCapacity(handle, 19)
    # nvml.h: placements are returned "regardless of whether MIG is enabled or not".
    assert placements(handle, 9) == [(0, 4), (4, 4)]


def test_sim_geometry_matches_accelguards_reference_tables(all_mig: SimDir) -> None:
    for gpu, model in enumerate(MODELS):
        handle = pynvml.nvmlDeviceGetHandleByIndex(gpu)
        reference = {p.profile_id: p for p in REFERENCE_GEOMETRIES[model].profiles}
        seen = set()
        for index in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
            try:
                info = pynvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, index)
            except pynvml.NVMLError_NotSupported:
                continue
            expected = reference[info.id]
            found = placements(handle, info.id)
            assert info.name == f"MIG {expected.name}"
            assert info.sliceCount == expected.compute_slices
            assert info.instanceCount == expected.max_instances
            assert tuple(start for start, _ in found) == expected.starts
            assert {size for _, size in found} == {expected.memory_slices}
            seen.add(info.id)
        assert seen == set(reference)


def ci_placements(gi: Any, profile_id: int) -> list[tuple[int, int]]:
    array = (pynvml.c_nvmlComputeInstancePlacement_t * 16)()
    count = ctypes.c_uint(16)
    pynvml.nvmlGpuInstanceGetComputeInstancePossiblePlacements(
        gi, profile_id, array, ctypes.byref(count)
    )
    return [(array[i].start, array[i].size) for i in range(count.value)]


@pytest.mark.parametrize("gpu", [0, 1], ids=MODELS[:2])
@pytest.mark.parametrize("gi_profile_index", [0, 1, 2, 3, 4, 7, 9])
def test_ci_profiles_offered_by_each_gi(all_mig: SimDir, gpu: int, gi_profile_index: int) -> None:
    handle = pynvml.nvmlDeviceGetHandleByIndex(gpu)
    profile_id, gi_slices, *_ = GI_PROFILES[gi_profile_index]
    gi = pynvml.nvmlDeviceCreateGpuInstance(handle, profile_id)
    gi_info = pynvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, gi_profile_index)
    offered = []
    for index in range(pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT):
        try:
            info = pynvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(
                gi, index, pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED
            )
        except pynvml.NVMLError_NotSupported:
            continue
        assert info.id == index
        assert info.version == pynvml.nvmlComputeInstanceProfileInfo_v2
        slices = info.sliceCount
        offered.append(slices)
        gi_name = NAMES[MODELS[gpu]][gi_profile_index]
        assert info.name == (
            f"MIG {gi_name}" if slices == gi_slices else f"MIG {slices}c.{gi_name}"
        )
        if slices == gi_slices:
            assert info.multiprocessorCount == gi_info.multiprocessorCount
        assert info.sharedCopyEngineCount == gi_info.copyEngineCount
        found = ci_placements(gi, index)
        assert info.instanceCount == len(found)
        assert all(size == slices and start + size <= gi_slices for start, size in found)
        assert pynvml.nvmlGpuInstanceGetComputeInstanceRemainingCapacity(gi, index) == len(found)
        v1 = pynvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, index, 0, version=1)
        assert (v1.id, v1.sliceCount, v1.instanceCount) == (index, slices, info.instanceCount)
    assert offered == CI_SLICES[gi_slices]
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(
            gi, pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT, 0
        )
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, 0, 1)


def test_ci_placements_in_a_7g_instance(all_mig: SimDir) -> None:
    gi = pynvml.nvmlDeviceCreateGpuInstance(pynvml.nvmlDeviceGetHandleByIndex(0), 0)
    assert ci_placements(gi, 0) == [(s, 1) for s in range(7)]
    assert ci_placements(gi, 1) == [(0, 2), (2, 2), (4, 2)]
    assert ci_placements(gi, 2) == [(0, 3), (4, 3)]
    assert ci_placements(gi, 3) == [(0, 4)]
    assert ci_placements(gi, 4) == [(0, 7)]
