"""An independent brute-force reference for the MIG planner tests.

Written to be obviously right rather than fast, and sharing no code with agent.hw.mig.planner: it
enumerates every assignment of placement starts and checks each with the plain definition of a
valid layout.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import pytest

from agent.errors import LayoutError
from agent.hw.mig.geometry import GiProfile, GpuGeometry, Instance, Placement
from agent.hw.mig.planner import LayoutPlan, plan_layout
from agent.hw.mig.profiles import REFERENCE_GEOMETRIES

# A placement as the reference sees it: (profile id, start, size).
Slot = tuple[int, int, int]

# On the NVIDIA reference GPUs every layout the counting checks allow can be placed; this
# made-up GPU has misaligned starts, so that the planner's search, not its counting, decides
# feasibility, and which instances can be kept is less obvious.
AWKWARD_GPU = GpuGeometry(
    model="Awkward-GPU",
    compute_slices=8,
    memory_slices=8,
    profiles=(
        GiProfile(1, "1g.odd", 1, 1, (1, 3, 5, 7), 4),
        GiProfile(2, "2g.odd", 2, 2, (0, 3, 6), 3),
        GiProfile(3, "3g.odd", 2, 3, (0, 2, 5), 2),
        GiProfile(4, "4g.odd", 3, 4, (2,), 1),
        GiProfile(5, "1g.any", 1, 1, tuple(range(8)), 8),
    ),
)
GEOMETRIES = {**REFERENCE_GEOMETRIES, AWKWARD_GPU.model: AWKWARD_GPU}


def layout_problem(geometry: GpuGeometry, slots: Sequence[Slot]) -> str | None:
    """Why ``slots`` is not a valid layout on ``geometry``, or None when it is."""
    profiles = {profile.profile_id: profile for profile in geometry.profiles}
    used_slices: list[int] = []
    compute = 0
    for profile_id, start, size in slots:
        if profile_id not in profiles:
            return f"unknown profile {profile_id}"
        profile = profiles[profile_id]
        if start not in profile.starts:
            return f"{profile.name} cannot start at {start}"
        if size != profile.memory_slices:
            return f"{profile.name} has size {profile.memory_slices}, not {size}"
        used_slices.extend(range(start, start + size))
        compute += profile.compute_slices
    if len(used_slices) != len(set(used_slices)):
        return "two instances share a memory slice"
    if any(not 0 <= index < geometry.memory_slices for index in used_slices):
        return "an instance lies outside the GPU's memory"
    if compute > geometry.compute_slices:
        return f"needs {compute} compute slices"
    for profile_id, count in Counter(slot[0] for slot in slots).items():
        if count > profiles[profile_id].max_instances:
            return f"{count} instances of {profiles[profile_id].name}"
    return None


def assignments(geometry: GpuGeometry, counts: Mapping[int, int]) -> Iterator[list[Slot]]:
    """Every way to give each profile ``counts[profile_id]`` distinct starts (valid or not)."""
    profiles = {profile.profile_id: profile for profile in geometry.profiles}
    per_profile = [
        [
            [(profile_id, start, profiles[profile_id].memory_slices) for start in starts]
            for starts in itertools.combinations(profiles[profile_id].starts, count)
        ]
        for profile_id, count in counts.items()
        if count > 0
    ]
    for choice in itertools.product(*per_profile):
        yield [slot for group in choice for slot in group]


def valid_assignments(geometry: GpuGeometry, counts: Mapping[int, int]) -> Iterator[list[Slot]]:
    # The compute and per-profile limits depend on the counts alone, so when the counts break
    # them no assignment is valid; checking them first spares enumerating millions of
    # assignments that layout_problem would reject anyway.
    profiles = {profile.profile_id: profile for profile in geometry.profiles}
    compute = sum(profiles[profile_id].compute_slices * n for profile_id, n in counts.items())
    if compute > geometry.compute_slices:
        return
    if any(n > profiles[profile_id].max_instances for profile_id, n in counts.items()):
        return
    for slots in assignments(geometry, counts):
        if layout_problem(geometry, slots) is None:
            yield slots


def first_valid_assignment(geometry: GpuGeometry, counts: Mapping[int, int]) -> list[Slot] | None:
    return next(valid_assignments(geometry, counts), None)


@functools.cache
def all_valid_layouts(geometry: GpuGeometry) -> tuple[tuple[Slot, ...], ...]:
    """Every valid layout on ``geometry``, from the empty one up.

    Include-or-skip each possible placement in turn; a branch is cut as soon as its partial
    layout is invalid, which loses nothing because every subset of a valid layout is valid.
    """
    every_slot = [
        (profile.profile_id, start, profile.memory_slices)
        for profile in geometry.profiles
        for start in profile.starts
    ]
    layouts: list[tuple[Slot, ...]] = []

    def extend(index: int, chosen: list[Slot]) -> None:
        if index == len(every_slot):
            layouts.append(tuple(chosen))
            return
        extend(index + 1, chosen)
        with_slot = [*chosen, every_slot[index]]
        if layout_problem(geometry, with_slot) is None:
            extend(index + 1, with_slot)

    extend(0, [])
    return tuple(sorted(layouts, key=len))


def counts_of(slots: Sequence[Slot]) -> dict[int, int]:
    return dict(Counter(slot[0] for slot in slots))


def slot_of(placement: Placement) -> Slot:
    return (placement.profile_id, placement.start, placement.size)


def plan_or_error(
    geometry: GpuGeometry,
    desired: Mapping[str, int],
    existing: Sequence[Instance] = (),
    pinned: Sequence[int] | set[int] = (),
) -> LayoutPlan | LayoutError:
    """The planner's answer, refusal included, as a value tests can compare."""
    try:
        return plan_layout(geometry, desired, existing, pinned)
    except LayoutError as error:
        return error


@dataclass(frozen=True)
class Reference:
    """The brute-force helpers, handed to tests through the ``reference`` fixture."""

    geometries = GEOMETRIES
    layout_problem = staticmethod(layout_problem)
    assignments = staticmethod(assignments)
    valid_assignments = staticmethod(valid_assignments)
    first_valid_assignment = staticmethod(first_valid_assignment)
    all_valid_layouts = staticmethod(all_valid_layouts)
    counts_of = staticmethod(counts_of)
    slot_of = staticmethod(slot_of)
    plan_or_error = staticmethod(plan_or_error)


@pytest.fixture(scope="session")
def reference() -> Reference:
    return Reference()
