"""Pure MIG placement planner: wanted GPU-instance profile counts -> placements, no I/O.

A GPU's memory is cut into memory slices; a GPU instance (GI) of a profile occupies
``memory_slices`` consecutive slices beginning at one of the profile's placement starts, and
consumes ``compute_slices`` of the GPU's compute slices. Two instances may not share a memory
slice (NVML answers NVML_ERROR_INSUFFICIENT_RESOURCES), the compute slices in use may not exceed
the GPU's, and each profile allows at most ``max_instances`` instances.

The planner is exact (a bounded exhaustive search, so "infeasible" is a proof, not a heuristic
giving up) and conservative: unlike NVIDIA mig-parted, which destroys every instance and
rebuilds, it keeps the largest possible set of existing instances and destroys only what must
change, and it never destroys a pinned (leased or not yet scrubbed) instance.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from agent.errors import LayoutError
from agent.hw.mig.geometry import (
    MAX_COUNT,
    GiProfile,
    GpuGeometry,
    Instance,
    Placement,
    is_int,
    show_value,
)

_MAX_COUNT_DIGITS = len(str(MAX_COUNT))
_COUNT_PATTERN = re.compile(rf"[0-9]{{1,{_MAX_COUNT_DIGITS}}}")


@dataclass(frozen=True, slots=True)
class LayoutPlan:
    """How to get from the existing instances to the wanted layout: destroy, then create."""

    keep: tuple[Instance, ...]
    destroy: tuple[Instance, ...]
    create: tuple[Placement, ...]

    @property
    def is_noop(self) -> bool:
        return not self.destroy and not self.create


def plan_layout(
    geometry: GpuGeometry,
    desired: Mapping[str, int],
    existing: Sequence[Instance],
    pinned: Collection[int] = (),
) -> LayoutPlan:
    """Plan the cheapest change from ``existing`` to exactly the ``desired`` profile counts.

    Keeps as many existing instances as any valid layout allows (ties go to the lower GI ids),
    never destroys an instance whose GI id is in ``pinned``, and raises LayoutError with the
    reason when the layout is malformed, impossible on this GPU, or blocked by a pinned instance.
    """
    wanted = _resolve_desired(geometry, desired)
    stages = sorted(wanted.items(), key=lambda item: _size_order(item[0]))
    spec = _format_spec(stages)
    _check_capacity(geometry, stages, spec)
    if _complete(stages, 0) is None:
        raise LayoutError(
            f"no non-overlapping placement exists for {spec} on {geometry.model} "
            f"({geometry.memory_slices} memory slices)"
        )

    by_gi_id = _index_existing(geometry, existing)
    pinned_instances = _resolve_pinned(geometry, by_gi_id, pinned)
    keepable = _keepable(geometry, wanted, existing)
    _check_pinned_keepable(geometry, wanted, pinned_instances, keepable, spec)

    pinned_ids = {instance.gi_id for instance in pinned_instances}
    pinned_state = _add_all(pinned_instances, _KeepState(0, {}))
    if pinned_state is None:
        listed = ", ".join(_describe(geometry, instance) for instance in pinned_instances)
        raise LayoutError(
            f"existing MIG layout on {geometry.model} is inconsistent: pinned GPU instances "
            f"{listed} overlap; re-read the GPU's instances"
        )
    pinned_only = _complete(_remaining(stages, pinned_state.counts), pinned_state.occupied)
    if pinned_only is None:
        raise _pinned_blocks(geometry, stages, pinned_instances, spec)

    candidates = sorted(
        (instance for instance in keepable if instance.gi_id not in pinned_ids),
        key=lambda instance: instance.gi_id,
    )
    kept, creations = _largest_keep(stages, candidates, pinned_state, pinned_only)
    kept_instances = (*pinned_instances, *kept)
    kept_ids = {instance.gi_id for instance in kept_instances}
    return LayoutPlan(
        keep=tuple(sorted(kept_instances, key=lambda instance: instance.gi_id)),
        destroy=tuple(
            sorted(
                (instance for instance in existing if instance.gi_id not in kept_ids),
                key=lambda instance: instance.gi_id,
            )
        ),
        create=tuple(creations),
    )


def parse_layout_spec(items: Sequence[str]) -> dict[str, int]:
    """Parse CLI layout items such as ``3g.40gb=2`` or ``3g.40gb=1,2g.20gb=1`` into counts."""
    counts: dict[str, int] = {}
    for item in items:
        if not isinstance(item, str):
            raise LayoutError(f"invalid MIG layout item {item!r}: expected text like '3g.40gb=2'")
        for part in item.split(","):
            name, separator, count_text = part.partition("=")
            name = name.strip()
            count_text = count_text.strip()
            if not separator:
                raise LayoutError(
                    f"invalid MIG layout item {item!r}: {part.strip()!r} is not PROFILE=COUNT "
                    "(e.g. 3g.40gb=2)"
                )
            if not name:
                raise LayoutError(f"invalid MIG layout item {item!r}: the profile name is empty")
            if not name.isprintable():
                raise LayoutError(
                    f"invalid MIG layout item {item!r}: the profile name {name!r} has "
                    "unprintable characters"
                )
            if not _COUNT_PATTERN.fullmatch(count_text):
                raise LayoutError(
                    f"invalid MIG layout item {item!r}: count {count_text!r} for {name} is not "
                    f"a non-negative integer of at most {_MAX_COUNT_DIGITS} digits"
                )
            if name in counts:
                raise LayoutError(f"invalid MIG layout item {item!r}: {name} is given twice")
            counts[name] = int(count_text)
    return counts


# --- validation -------------------------------------------------------------------------------


def _resolve_desired(geometry: GpuGeometry, desired: Mapping[str, int]) -> dict[GiProfile, int]:
    wanted: dict[GiProfile, int] = {}
    named_as: dict[GiProfile, str] = {}
    for name, count in desired.items():
        profile = geometry.profile(name)
        if not is_int(count) or count < 0:
            raise LayoutError(
                f"invalid MIG layout for {geometry.model}: the count for {name!r} must be a "
                f"non-negative integer, not {show_value(count)}"
            )
        if count > MAX_COUNT:
            raise LayoutError(
                f"invalid MIG layout for {geometry.model}: the count for {name!r} is larger "
                f"than {MAX_COUNT}"
            )
        if profile in named_as:
            raise LayoutError(
                f"invalid MIG layout for {geometry.model}: {name!r} and {named_as[profile]!r} "
                f"both name profile {profile.name} (id {profile.profile_id})"
            )
        named_as[profile] = str(name)
        if count > 0:
            wanted[profile] = count
    return wanted


def _check_capacity(
    geometry: GpuGeometry, stages: Sequence[tuple[GiProfile, int]], spec: str
) -> None:
    prefix = f"cannot place {spec} on {geometry.model}"
    for profile, count in stages:
        if count > profile.max_instances:
            raise LayoutError(
                f"{prefix}: {profile.name}={count}: the GPU supports at most "
                f"{profile.max_instances}"
            )
        if count > len(profile.starts):
            raise LayoutError(
                f"{prefix}: {profile.name}={count}: the profile has only "
                f"{len(profile.starts)} placements"
            )
    compute = sum(profile.compute_slices * count for profile, count in stages)
    if compute > geometry.compute_slices:
        raise LayoutError(
            f"{prefix}: compute slices: the layout needs {compute}, "
            f"the GPU has {geometry.compute_slices}"
        )
    memory = sum(profile.memory_slices * count for profile, count in stages)
    if memory > geometry.memory_slices:
        raise LayoutError(
            f"{prefix}: memory slices: the layout needs {memory}, "
            f"the GPU has {geometry.memory_slices}"
        )


def _index_existing(geometry: GpuGeometry, existing: Sequence[Instance]) -> dict[int, Instance]:
    by_gi_id: dict[int, Instance] = {}
    for instance in existing:
        if instance.gi_id in by_gi_id:
            raise LayoutError(
                f"existing MIG layout on {geometry.model} lists GPU instance {instance.gi_id} "
                "twice; re-read the GPU's instances"
            )
        by_gi_id[instance.gi_id] = instance
    return by_gi_id


def _resolve_pinned(
    geometry: GpuGeometry, by_gi_id: Mapping[int, Instance], pinned: Collection[int]
) -> tuple[Instance, ...]:
    resolved: list[Instance] = []
    for gi_id in sorted(set(pinned)):
        if gi_id not in by_gi_id:
            raise LayoutError(
                f"pinned GPU instance {gi_id} does not exist on this {geometry.model}; "
                f"existing instances: {sorted(by_gi_id) or 'none'}"
            )
        resolved.append(by_gi_id[gi_id])
    return tuple(resolved)


def _keepable(
    geometry: GpuGeometry, wanted: Mapping[GiProfile, int], existing: Sequence[Instance]
) -> list[Instance]:
    """Existing instances of a wanted profile that sit on a placement the profile allows."""
    wanted_by_id = {profile.profile_id: profile for profile in wanted}
    return [
        instance
        for instance in existing
        if instance.profile_id in wanted_by_id
        and _fits_profile(instance, wanted_by_id[instance.profile_id], geometry)
    ]


def _fits_profile(instance: Instance, profile: GiProfile, geometry: GpuGeometry) -> bool:
    return (
        instance.start in profile.starts
        and instance.size == profile.memory_slices
        and instance.start + instance.size <= geometry.memory_slices
    )


def _check_pinned_keepable(
    geometry: GpuGeometry,
    wanted: Mapping[GiProfile, int],
    pinned_instances: Sequence[Instance],
    keepable: Sequence[Instance],
    spec: str,
) -> None:
    keepable_ids = {instance.gi_id for instance in keepable}
    for instance in pinned_instances:
        if instance.gi_id in keepable_ids:
            continue
        name = _profile_name(geometry, instance.profile_id)
        if not any(profile.profile_id == instance.profile_id for profile in wanted):
            why = f"the layout {spec} has no {name}"
        else:
            why = (
                f"its placement (start {instance.start}, size {instance.size}) is not one "
                f"{name} allows"
            )
        raise LayoutError(
            f"cannot realise {spec} on {geometry.model}: pinned GPU instance "
            f"{_describe(geometry, instance)} blocks it: {why}; release or scrub it first"
        )
    for profile, count in wanted.items():
        same = [i for i in pinned_instances if i.profile_id == profile.profile_id]
        if len(same) > count:
            listed = ", ".join(_describe(geometry, instance) for instance in same)
            raise LayoutError(
                f"cannot realise {spec} on {geometry.model}: pinned GPU instances {listed} block "
                f"it: the layout wants {count} {profile.name}, {len(same)} are pinned"
            )


def _pinned_blocks(
    geometry: GpuGeometry,
    stages: Sequence[tuple[GiProfile, int]],
    pinned_instances: Sequence[Instance],
    spec: str,
) -> LayoutError:
    """Name the pinned instances whose removal alone would make the layout feasible."""
    blockers = [
        instance
        for instance in pinned_instances
        if _feasible_with(stages, [i for i in pinned_instances if i is not instance])
    ] or list(pinned_instances)
    listed = ", ".join(_describe(geometry, instance) for instance in blockers)
    if len(blockers) == 1:
        subject = f"pinned GPU instance {listed} blocks it"
    else:
        subject = f"pinned GPU instances {listed} block it"
    return LayoutError(
        f"cannot realise {spec} on {geometry.model}: {subject}: the other instances cannot be "
        "placed around it without overlap; release or scrub it first, or choose a layout "
        "that fits around it"
    )


def _feasible_with(stages: Sequence[tuple[GiProfile, int]], kept: Sequence[Instance]) -> bool:
    state = _add_all(kept, _KeepState(0, {}))
    return (
        state is not None
        and _complete(_remaining(stages, state.counts), state.occupied) is not None
    )


def _describe(geometry: GpuGeometry, instance: Instance) -> str:
    return (
        f"{instance.gi_id} ({_profile_name(geometry, instance.profile_id)} at memory slice "
        f"{instance.start})"
    )


def _profile_name(geometry: GpuGeometry, profile_id: int) -> str:
    for profile in geometry.profiles:
        if profile.profile_id == profile_id:
            return profile.name
    return f"unknown profile {profile_id}"


def _format_spec(stages: Sequence[tuple[GiProfile, int]]) -> str:
    return ", ".join(f"{profile.name}={count}" for profile, count in stages) or "no instances"


def _size_order(profile: GiProfile) -> tuple[int, int, int]:
    # Largest first: big instances have the fewest placements, so placing them first prunes the
    # search early; the profile id breaks ties so that plans are reproducible.
    return (-profile.memory_slices, -profile.compute_slices, profile.profile_id)


# --- search -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _KeepState:
    occupied: int  # bit i set = memory slice i is taken
    counts: dict[int, int]  # profile id -> instances kept


def _slice_mask(start: int, size: int) -> int:
    return ((1 << size) - 1) << start


def _add_all(instances: Sequence[Instance], state: _KeepState) -> _KeepState | None:
    occupied = state.occupied
    counts = dict(state.counts)
    for instance in instances:
        mask = _slice_mask(instance.start, instance.size)
        if occupied & mask:
            return None
        occupied |= mask
        counts[instance.profile_id] = counts.get(instance.profile_id, 0) + 1
    return _KeepState(occupied, counts)


def _remaining(
    stages: Sequence[tuple[GiProfile, int]], kept_counts: Mapping[int, int]
) -> list[tuple[GiProfile, int]]:
    """What is still to create once ``kept_counts`` are kept (callers never keep too many)."""
    return [(profile, count - kept_counts.get(profile.profile_id, 0)) for profile, count in stages]


def _largest_keep(
    stages: Sequence[tuple[GiProfile, int]],
    candidates: Sequence[Instance],
    base: _KeepState,
    base_creations: list[Placement],
) -> tuple[tuple[Instance, ...], list[Placement]]:
    """Branch and bound over keep/destroy per candidate; every node visited is completable.

    Completability is monotone (if a set of kept instances can be completed, so can each subset:
    the dropped instances' own placements complete it), so a subtree is cut as soon as its kept
    set cannot be completed, and trying "keep" before "destroy" in GI-id order makes the first
    maximum found the one keeping the lowest GI ids. Returns the kept candidates and the
    placements that complete them.
    """
    best: tuple[tuple[Instance, ...], list[Placement]] = ((), base_creations)
    chosen: list[Instance] = []
    allowed = {profile.profile_id: count for profile, count in stages}

    def search(
        index: int, occupied: int, counts: dict[int, int], creations: list[Placement]
    ) -> None:
        nonlocal best
        if len(chosen) + (len(candidates) - index) <= len(best[0]):
            return
        if index == len(candidates):
            best = (tuple(chosen), creations)
            return
        candidate = candidates[index]
        mask = _slice_mask(candidate.start, candidate.size)
        profile_id = candidate.profile_id
        if not occupied & mask and counts.get(profile_id, 0) < allowed[profile_id]:
            counts[profile_id] = counts.get(profile_id, 0) + 1
            completion = _complete(_remaining(stages, counts), occupied | mask)
            if completion is not None:
                chosen.append(candidate)
                search(index + 1, occupied | mask, counts, completion)
                chosen.pop()
            counts[profile_id] -= 1
        search(index + 1, occupied, counts, creations)

    search(0, base.occupied, dict(base.counts), base_creations)
    return best


def _complete(stages: Sequence[tuple[GiProfile, int]], occupied: int) -> list[Placement] | None:
    """Place every remaining instance without overlap, or prove it impossible (None).

    Depth-first over profiles (largest first) choosing each profile's starts in increasing order
    (instances of one profile are interchangeable, so only combinations are tried), with failed
    states memoised: the state space is tiny (profiles x counts x starts x 2**memory_slices).
    """
    options = [
        (
            profile,
            count,
            [
                (start, _slice_mask(start, profile.memory_slices))
                for start in sorted(profile.starts)
            ],
        )
        for profile, count in stages
        if count > 0
    ]
    failed: set[tuple[int, int, int, int]] = set()
    chosen: list[Placement] = []

    def fill(stage: int, left: int, first_option: int, taken: int) -> bool:
        if left == 0:
            stage += 1
            if stage == len(options):
                return True
            left = options[stage][1]
            first_option = 0
        key = (stage, left, first_option, taken)
        if key in failed:
            return False
        profile, _, placements = options[stage]
        for option in range(first_option, len(placements) - left + 1):
            start, mask = placements[option]
            if taken & mask:
                continue
            chosen.append(Placement(profile.profile_id, start, profile.memory_slices))
            if fill(stage, left - 1, option + 1, taken | mask):
                return True
            chosen.pop()
        failed.add(key)
        return False

    if not options:
        return []
    if fill(0, options[0][1], 0, occupied):
        return chosen
    return None
