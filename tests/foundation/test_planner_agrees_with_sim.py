"""Every profile-count combination of H100 and A100: the planner and nvml-sim agree.

Feasible combinations: the planner's placements are all accepted by the sim. Infeasible ones: a
search driven only by the sim's own answers (create with placement, back off on
INSUFFICIENT_RESOURCES) finds no way to realise them either. The sim is reached through pynvml, as
the agent reaches a real driver.
"""

from __future__ import annotations

import ctypes
import itertools
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pynvml
import pytest

from agent.config import load_config
from agent.errors import LayoutError
from agent.hw.mig.geometry import GiProfile, GpuGeometry
from agent.hw.mig.planner import plan_layout
from agent.hw.mig.profiles import REFERENCE_GEOMETRIES
from agent.hw.nvml import NvmlBackend
from agent.sim.node import init_sim_node

pytestmark = pytest.mark.slow

CASES = {"h100x1": "H100-80GB", "a100x1": "A100-40GB", "a100-80x1": "A100-80GB"}


@pytest.fixture(params=sorted(CASES))
def sim_gpu(request: pytest.FixtureRequest) -> Iterator[tuple[str, NvmlBackend]]:
    # tmpfs: the sim fsyncs its state on every mutation, and this test makes tens of thousands.
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(dir=base) as scratch:
        node = init_sim_node(Path(scratch) / "node", request.param)
        config = load_config(node.config_path)
        backend = NvmlBackend(library=config.nvml.library, sim_dir=config.nvml.sim_dir)
        backend.open()
        try:
            yield CASES[request.param], backend
        finally:
            backend.close()


def _create(handle: object, profile: GiProfile, start: int) -> object | None:
    placement = pynvml.c_nvmlGpuInstancePlacement_t()
    placement.start = start
    placement.size = profile.memory_slices
    try:
        return pynvml.nvmlDeviceCreateGpuInstanceWithPlacement(
            handle, profile.profile_id, ctypes.byref(placement)
        )
    except pynvml.NVMLError as error:
        assert error.value == pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES, error
        return None


def _sim_can_realise(handle: object, wanted: list[GiProfile], floor: int = -1) -> bool:
    """Depth-first search over placements, asking only the sim what fits."""
    if not wanted:
        return True
    profile, rest = wanted[0], wanted[1:]
    for start in profile.starts:
        if start <= floor:
            continue  # instances of one profile are interchangeable: place them in order
        instance = _create(handle, profile, start)
        if instance is None:
            continue
        try:
            next_floor = start if rest and rest[0] == profile else -1
            if _sim_can_realise(handle, rest, next_floor):
                return True
        finally:
            pynvml.nvmlGpuInstanceDestroy(instance)
    return False


def _combinations(geometry: GpuGeometry) -> Iterator[dict[str, int]]:
    ranges = [range(p.max_instances + 1) for p in geometry.profiles]
    for counts in itertools.product(*ranges):
        yield {p.name: c for p, c in zip(geometry.profiles, counts, strict=True)}


def test_sim_geometry_matches_reference(sim_gpu: tuple[str, NvmlBackend]) -> None:
    model, backend = sim_gpu
    reference = REFERENCE_GEOMETRIES[model]
    geometry = backend.geometry(0)
    assert sorted(geometry.profiles, key=lambda p: p.profile_id) == sorted(
        reference.profiles, key=lambda p: p.profile_id
    )
    assert (geometry.compute_slices, geometry.memory_slices) == (7, 8)


def test_every_combination_agrees(sim_gpu: tuple[str, NvmlBackend]) -> None:
    model, backend = sim_gpu
    geometry = backend.geometry(0)
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    feasible = infeasible = 0
    for counts in _combinations(geometry):
        try:
            plan = plan_layout(geometry, counts, [])
        except LayoutError:
            infeasible += 1
            wanted = sorted(
                (p for p in geometry.profiles for _ in range(counts[p.name])),
                key=lambda p: (-p.memory_slices, -p.compute_slices, p.profile_id),
            )
            assert not _sim_can_realise(handle, wanted), f"{model}: sim realises {counts}"
            continue
        feasible += 1
        created = []
        try:
            for placement in plan.create:
                profile = geometry.profile(str(placement.profile_id))
                instance = _create(handle, profile, placement.start)
                assert instance is not None, f"{model}: sim refuses {placement} of {counts}"
                created.append(instance)
        finally:
            for instance in reversed(created):
                pynvml.nvmlGpuInstanceDestroy(instance)
    assert feasible + infeasible == len(list(_combinations(geometry)))
    assert feasible > 100 and infeasible > 1000  # both branches really ran
