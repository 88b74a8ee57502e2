"""Every combination of profile counts on every reference GPU, checked against brute force."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from agent.errors import LayoutError
from agent.hw.mig.geometry import GpuGeometry, Instance
from agent.hw.mig.planner import plan_layout
from agent.hw.mig.profiles import REFERENCE_GEOMETRIES

MODELS = [*sorted(REFERENCE_GEOMETRIES), "Awkward-GPU"]


def all_count_combinations(geometry: GpuGeometry) -> list[dict[int, int]]:
    ranges = [range(profile.max_instances + 1) for profile in geometry.profiles]
    ids = [profile.profile_id for profile in geometry.profiles]
    return [dict(zip(ids, counts, strict=True)) for counts in itertools.product(*ranges)]


@pytest.mark.parametrize("model", MODELS)
def test_every_combination_from_empty_agrees_with_brute_force(model: str, reference: Any) -> None:
    geometry = reference.geometries[model]
    names = {profile.profile_id: profile.name for profile in geometry.profiles}
    combinations = all_count_combinations(geometry)
    if model in REFERENCE_GEOMETRIES:
        assert len(combinations) == 3840
    feasible = 0
    for counts in combinations:
        desired = {names[profile_id]: count for profile_id, count in counts.items()}
        witness = reference.first_valid_assignment(geometry, counts)
        plan = reference.plan_or_error(geometry, desired)
        if isinstance(plan, LayoutError):
            assert witness is None, f"{desired}: planner said {plan}, but {witness} is valid"
            assert geometry.model in str(plan)
            continue
        assert witness is not None, f"{desired}: planner placed {plan.create}, brute force: none"
        slots = [reference.slot_of(placement) for placement in plan.create]
        assert reference.layout_problem(geometry, slots) is None, (desired, plan)
        assert reference.counts_of(slots) == {k: v for k, v in counts.items() if v}, desired
        assert plan.keep == ()
        assert plan.destroy == ()
        feasible += 1
    assert 0 < feasible < len(combinations)


def test_the_awkward_gpu_exercises_the_search(reference: Any) -> None:
    """Some of its layouts pass every counting check yet cannot be placed."""
    awkward = reference.geometries["Awkward-GPU"]
    profiles = {profile.profile_id: profile for profile in awkward.profiles}
    search_only = 0
    for counts in all_count_combinations(awkward):
        compute = sum(profiles[i].compute_slices * n for i, n in counts.items())
        memory = sum(profiles[i].memory_slices * n for i, n in counts.items())
        fits_counts = (
            compute <= 8
            and memory <= 8
            and all(
                n <= min(profiles[i].max_instances, len(profiles[i].starts))
                for i, n in counts.items()
            )
        )
        if fits_counts and reference.first_valid_assignment(awkward, counts) is None:
            search_only += 1
            desired = {profiles[i].name: n for i, n in counts.items()}
            error = reference.plan_or_error(awkward, desired)
            assert "no non-overlapping placement exists" in str(error)
    assert search_only >= 10, search_only


@pytest.mark.parametrize("model", MODELS)
def test_created_layout_realised_then_replanned_is_a_noop(model: str, reference: Any) -> None:
    """Planning a layout, "creating" it, and planning the same counts again changes nothing."""
    geometry = reference.geometries[model]
    names = {profile.profile_id: profile.name for profile in geometry.profiles}
    for counts in all_count_combinations(geometry):
        desired = {names[profile_id]: count for profile_id, count in counts.items()}
        try:
            plan = plan_layout(geometry, desired, [])
        except LayoutError:
            continue
        existing = [
            Instance(gi_id=index + 1, profile_id=p.profile_id, start=p.start, size=p.size)
            for index, p in enumerate(plan.create)
        ]
        again = plan_layout(geometry, desired, existing)
        assert again.is_noop, (desired, again)
        assert again.keep == tuple(existing)
