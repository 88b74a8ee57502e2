"""Re-planning from existing layouts: keep as many instances as possible, never a pinned one."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import LayoutError
from agent.hw.mig.geometry import GpuGeometry, Instance
from agent.hw.mig.planner import LayoutPlan, plan_layout
from agent.hw.mig.profiles import A100_40GB, H100_80GB, REFERENCE_GEOMETRIES

Slot = tuple[int, int, int]

# The reference fixture is session-scoped, so sharing it across examples is safe.
PROPERTY_SETTINGS = settings(
    max_examples=800,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@st.composite
def existing_layouts(draw: st.DrawFn, geometry: GpuGeometry, reference: Any) -> list[Instance]:
    """Any valid layout, with GI ids in ascending, descending or shuffled order."""
    slots = draw(st.sampled_from(reference.all_valid_layouts(geometry)))
    numbering = draw(st.sampled_from(["ascending", "descending", "shuffled"]))
    if numbering == "shuffled":
        gi_ids = random.Random(draw(st.integers(0, 2**32))).sample(range(64), len(slots))
    else:
        gi_ids = list(range(1, len(slots) + 1))
        if numbering == "descending":
            gi_ids.reverse()
    return [
        Instance(gi_id=gi_id, profile_id=profile_id, start=start, size=size)
        for gi_id, (profile_id, start, size) in zip(gi_ids, slots, strict=True)
    ]


@st.composite
def desired_counts(draw: st.DrawFn, geometry: GpuGeometry, reference: Any) -> dict[int, int]:
    """Either the counts of another valid layout (feasible) or any counts at all."""
    if draw(st.booleans()):
        layout = draw(existing_layouts(geometry, reference))
        return reference.counts_of([(i.profile_id, i.start, i.size) for i in layout])  # type: ignore[no-any-return]
    return {
        profile.profile_id: draw(st.integers(min_value=0, max_value=profile.max_instances))
        for profile in geometry.profiles
    }


def slot(instance: Instance) -> Slot:
    return (instance.profile_id, instance.start, instance.size)


def most_keepable(
    geometry: GpuGeometry,
    counts: dict[int, int],
    existing: list[Instance],
    pinned: set[int],
    reference: Any,
) -> int | None:
    """Brute force: the most existing instances any valid final layout keeps (None: no layout)."""
    existing_slots = {slot(instance) for instance in existing}
    pinned_slots = {slot(instance) for instance in existing if instance.gi_id in pinned}
    best: int | None = None
    for layout in reference.valid_assignments(geometry, counts):
        final = set(layout)
        if not pinned_slots <= final:
            continue
        kept = len(final & existing_slots)
        best = kept if best is None else max(best, kept)
    return best


def check_plan(
    geometry: GpuGeometry,
    counts: dict[int, int],
    existing: list[Instance],
    pinned: set[int],
    plan: LayoutPlan,
    reference: Any,
) -> None:
    assert set(plan.keep) <= set(existing)
    assert set(plan.keep).isdisjoint(plan.destroy)
    assert set(plan.keep) | set(plan.destroy) == set(existing)
    assert len(plan.keep) + len(plan.destroy) == len(existing)
    assert pinned <= {instance.gi_id for instance in plan.keep}
    final = [slot(instance) for instance in plan.keep] + [
        reference.slot_of(placement) for placement in plan.create
    ]
    assert reference.layout_problem(geometry, final) is None, plan
    assert reference.counts_of(final) == {k: v for k, v in counts.items() if v}


@PROPERTY_SETTINGS
@given(data=st.data(), model=st.sampled_from([*sorted(REFERENCE_GEOMETRIES), "Awkward-GPU"]))
def test_plan_keeps_the_most_instances_and_every_pinned_one(
    data: st.DataObject, model: str, reference: Any
) -> None:
    geometry = reference.geometries[model]
    existing = data.draw(existing_layouts(geometry, reference), label="existing")
    counts = data.draw(desired_counts(geometry, reference), label="desired")
    pinned = data.draw(
        st.sets(st.sampled_from([i.gi_id for i in existing])) if existing else st.just(set()),
        label="pinned",
    )
    desired = {geometry.profile(profile_id).name: n for profile_id, n in counts.items()}
    best = most_keepable(geometry, counts, existing, pinned, reference)
    plan = reference.plan_or_error(geometry, desired, existing, pinned)
    if isinstance(plan, LayoutError):
        assert best is None, f"planner refused ({plan}) but a layout keeping {best} exists"
        return
    assert best is not None, f"planner produced {plan} but brute force finds no layout"
    check_plan(geometry, counts, existing, pinned, plan, reference)
    assert len(plan.keep) == best


@settings(PROPERTY_SETTINGS, max_examples=400)
@given(data=st.data(), model=st.sampled_from(sorted(REFERENCE_GEOMETRIES)))
def test_planning_the_current_layout_is_a_noop(
    data: st.DataObject, model: str, reference: Any
) -> None:
    geometry = REFERENCE_GEOMETRIES[model]
    existing = data.draw(existing_layouts(geometry, reference))
    pinned = data.draw(
        st.sets(st.sampled_from([i.gi_id for i in existing])) if existing else st.just(set())
    )
    counts = reference.counts_of([slot(instance) for instance in existing])
    # Any spelling of the profiles names the same layout.
    spelling = data.draw(st.sampled_from(["name", "nvml", "id"]))
    desired = {
        {"name": p.name, "nvml": f"MIG {p.name}", "id": str(p.profile_id)}[spelling]: n
        for p in geometry.profiles
        if (n := counts.get(p.profile_id, 0))
    }
    plan = plan_layout(geometry, desired, existing, pinned)
    assert plan.is_noop
    assert set(plan.keep) == set(existing)


@settings(PROPERTY_SETTINGS, max_examples=200)
@given(data=st.data(), model=st.sampled_from(sorted(REFERENCE_GEOMETRIES)))
def test_plan_does_not_depend_on_the_order_instances_are_listed(
    data: st.DataObject, model: str, reference: Any
) -> None:
    geometry = REFERENCE_GEOMETRIES[model]
    existing = data.draw(existing_layouts(geometry, reference))
    counts = data.draw(desired_counts(geometry, reference))
    desired = {geometry.profile(profile_id).name: n for profile_id, n in counts.items()}
    shuffled = list(existing)
    random.Random(data.draw(st.integers())).shuffle(shuffled)
    plan = reference.plan_or_error(geometry, desired, existing)
    again = reference.plan_or_error(geometry, desired, shuffled)
    if isinstance(plan, LayoutError):
        assert isinstance(again, LayoutError)
        assert str(again) == str(plan)
    else:
        assert again == plan


def test_existing_instances_the_planner_cannot_keep_are_destroyed(reference: Any) -> None:
    geometry = H100_80GB
    existing = [
        Instance(gi_id=1, profile_id=9, start=0, size=4),  # 3g.40gb, wanted: kept
        Instance(gi_id=2, profile_id=99, start=4, size=1),  # a profile this GPU lacks
        Instance(gi_id=3, profile_id=19, start=7, size=1),  # 1g.10gb where it cannot start
        Instance(gi_id=4, profile_id=14, start=5, size=2),  # 2g.20gb misaligned
    ]
    plan = plan_layout(geometry, {"3g.40gb": 1, "1g.10gb": 1, "2g.20gb": 1}, existing)
    assert [i.gi_id for i in plan.keep] == [1]
    assert [i.gi_id for i in plan.destroy] == [2, 3, 4]
    check_plan(geometry, {9: 1, 19: 1, 14: 1}, existing, set(), plan, reference)


def test_only_what_must_change_is_destroyed() -> None:
    # 3g.40gb@0 + 2g.20gb@4 + 1g.10gb@6: asking for a 1g.20gb instead of the 1g.10gb keeps the
    # 3g and the 2g; mig-parted would destroy all three.
    existing = [
        Instance(gi_id=1, profile_id=9, start=0, size=4),
        Instance(gi_id=2, profile_id=14, start=4, size=2),
        Instance(gi_id=3, profile_id=19, start=6, size=1),
    ]
    plan = plan_layout(H100_80GB, {"3g.40gb": 1, "2g.20gb": 1, "1g.20gb": 1}, existing)
    assert [i.gi_id for i in plan.keep] == [1, 2]
    assert [i.gi_id for i in plan.destroy] == [3]
    assert [(p.profile_id, p.start) for p in plan.create] == [(15, 6)]


def test_a_kept_instance_may_force_others_elsewhere() -> None:
    # 1g.5gb@0 is kept; the 3g.20gb that fits only at 4 then, and the 2g.10gb goes to 2.
    existing = [Instance(gi_id=7, profile_id=19, start=0, size=1)]
    plan = plan_layout(A100_40GB, {"1g.5gb": 1, "3g.20gb": 1, "2g.10gb": 1}, existing)
    assert plan.keep == tuple(existing)
    assert sorted((p.profile_id, p.start) for p in plan.create) == [(9, 4), (14, 2)]


def test_keep_ties_go_to_the_lower_gi_id() -> None:
    # Two 3g.40gb exist, one is wanted: keep the lower GI id, whichever is listed first.
    existing = [
        Instance(gi_id=5, profile_id=9, start=0, size=4),
        Instance(gi_id=2, profile_id=9, start=4, size=4),
    ]
    plan = plan_layout(H100_80GB, {"3g.40gb": 1}, existing)
    assert [i.gi_id for i in plan.keep] == [2]
    assert [i.gi_id for i in plan.destroy] == [5]
    pinned_plan = plan_layout(H100_80GB, {"3g.40gb": 1}, existing, pinned=[5])
    assert [i.gi_id for i in pinned_plan.keep] == [5]
