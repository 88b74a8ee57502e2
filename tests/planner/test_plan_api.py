"""Profile lookup, geometry checks, input validation and the reasons the planner gives."""

from __future__ import annotations

import re
from typing import Any

import pytest

from agent.errors import LayoutError
from agent.hw.mig.geometry import GiProfile, GpuGeometry, Instance, Placement
from agent.hw.mig.planner import LayoutPlan, plan_layout
from agent.hw.mig.profiles import A100_40GB, A100_80GB, H100_80GB, REFERENCE_GEOMETRIES


def test_reference_geometries_match_the_nvidia_tables() -> None:
    assert set(REFERENCE_GEOMETRIES) == {"H100-80GB", "A100-40GB", "A100-80GB"}
    rows = {
        (p.profile_id, p.name, p.compute_slices, p.memory_slices, p.starts, p.max_instances)
        for p in H100_80GB.profiles
    }
    assert rows == {
        (19, "1g.10gb", 1, 1, (0, 1, 2, 3, 4, 5, 6), 7),
        (20, "1g.10gb+me", 1, 1, (0, 1, 2, 3, 4, 5, 6), 1),
        (15, "1g.20gb", 1, 2, (0, 2, 4, 6), 4),
        (14, "2g.20gb", 2, 2, (0, 2, 4), 3),
        (9, "3g.40gb", 3, 4, (0, 4), 2),
        (5, "4g.40gb", 4, 4, (0,), 1),
        (0, "7g.80gb", 7, 8, (0,), 1),
    }
    assert [p.name for p in A100_40GB.profiles] == [
        "1g.5gb",
        "1g.5gb+me",
        "1g.10gb",
        "2g.10gb",
        "3g.20gb",
        "4g.20gb",
        "7g.40gb",
    ]
    assert [p.name for p in A100_80GB.profiles] == [p.name for p in H100_80GB.profiles]
    for geometry in REFERENCE_GEOMETRIES.values():
        assert (geometry.compute_slices, geometry.memory_slices) == (7, 8)


@pytest.mark.parametrize("spelling", ["3g.40gb", "MIG 3g.40gb", "mig 3G.40GB", " 3g.40gb ", 9, "9"])
def test_profile_lookup_accepts_names_nvml_names_and_ids(spelling: int | str) -> None:
    assert H100_80GB.profile(spelling).profile_id == 9


@pytest.mark.parametrize("spelling", ["3g.20gb", "3g", "", "MIG", 42, "42", "-9", True, None, 9.0])
def test_unknown_profile_names_the_gpu_and_lists_the_valid_ones(spelling: Any) -> None:
    with pytest.raises(LayoutError, match="H100-80GB") as raised:
        H100_80GB.profile(spelling)
    message = str(raised.value)
    assert repr(spelling) in message
    for profile in H100_80GB.profiles:
        assert profile.name in message


def test_profile_lookup_tells_a100_40gb_names_apart() -> None:
    # "1g.10gb" is profile 19 on an H100-80GB but profile 15 on an A100-40GB.
    assert H100_80GB.profile("1g.10gb").profile_id == 19
    assert A100_40GB.profile("1g.10gb").profile_id == 15


def _profile(**changes: Any) -> GiProfile:
    fields: dict[str, Any] = {
        "profile_id": 9,
        "name": "3g.40gb",
        "compute_slices": 3,
        "memory_slices": 4,
        "starts": (0, 4),
        "max_instances": 2,
    }
    fields.update(changes)
    return GiProfile(**fields)


@pytest.mark.parametrize(
    ("profiles", "reason"),
    [
        ((_profile(starts=(0, 5)),), "does not fit"),
        ((_profile(starts=(0, 0)),), "listed twice"),
        ((_profile(), _profile()), "listed twice"),
        ((_profile(), _profile(profile_id=5, name="MIG 3G.40GB".lower()[4:])), "listed twice"),
        ((_profile(name=""),), "name is empty"),
        ((_profile(name="12"),), "mistaken for a profile id"),
        ((_profile(memory_slices=0),), "memory_slices"),
        ((_profile(compute_slices=True),), "compute_slices"),
        ((_profile(max_instances=-1),), "max_instances"),
        ((_profile(profile_id=-1),), "profile id"),
    ],
)
def test_inconsistent_geometry_is_refused(profiles: tuple[GiProfile, ...], reason: str) -> None:
    with pytest.raises(LayoutError, match=re.escape(reason)):
        GpuGeometry(model="Odd-GPU", compute_slices=7, memory_slices=8, profiles=profiles)


def test_geometry_needs_positive_slice_counts() -> None:
    with pytest.raises(LayoutError, match="memory_slices"):
        GpuGeometry(model="Odd-GPU", compute_slices=7, memory_slices=0, profiles=())


@pytest.mark.parametrize(
    ("desired", "reason"),
    [
        ({"7g.80gb": 2}, "7g.80gb=2: the GPU supports at most 1"),
        ({"1g.10gb": 7, "1g.10gb+me": 1}, "compute slices: the layout needs 8, the GPU has 7"),
        ({"3g.40gb": 2, "1g.10gb": 1}, "memory slices: the layout needs 9, the GPU has 8"),
        ({"4g.40gb": 1, "3g.40gb": 1, "1g.10gb": 0, "banana": 1}, "unknown MIG profile 'banana'"),
        ({"3g.40gb": -1}, "must be a non-negative integer, not -1"),
        ({"3g.40gb": True}, "must be a non-negative integer, not True"),
        ({"3g.40gb": 1.0}, "must be a non-negative integer, not 1.0"),
        ({"3g.40gb": 1, "MIG 3g.40gb": 1}, "both name profile 3g.40gb"),
        ({"9": 1, "3g.40gb": 0}, "both name profile 3g.40gb"),
    ],
)
def test_impossible_or_malformed_layouts_say_why(desired: dict[str, Any], reason: str) -> None:
    with pytest.raises(LayoutError, match=re.escape(reason)):
        plan_layout(H100_80GB, desired, [])


def test_a_layout_only_the_search_can_rule_out_says_so() -> None:
    # Counts, compute and memory all fit, but the one 2-slice start (1) overlaps every start of
    # the other profile: only the exhaustive search can tell.
    geometry = GpuGeometry(
        model="Odd-GPU",
        compute_slices=4,
        memory_slices=4,
        profiles=(
            GiProfile(1, "2g.a", 1, 2, (1,), 1),
            GiProfile(2, "2g.b", 1, 2, (0, 2), 2),
        ),
    )
    with pytest.raises(LayoutError) as raised:
        plan_layout(geometry, {"2g.a": 1, "2g.b": 1}, [])
    assert str(raised.value) == (
        "no non-overlapping placement exists for 2g.a=1, 2g.b=1 on Odd-GPU (4 memory slices)"
    )
    assert plan_layout(geometry, {"2g.b": 2}, []).create == (
        Placement(2, 0, 2),
        Placement(2, 2, 2),
    )


def test_zero_counts_and_empty_layouts_are_allowed() -> None:
    existing = [Instance(gi_id=1, profile_id=0, start=0, size=8)]
    plan = plan_layout(H100_80GB, {"7g.80gb": 0}, existing)
    assert plan == LayoutPlan(keep=(), destroy=tuple(existing), create=())
    assert plan_layout(H100_80GB, {}, []).is_noop


def test_creation_order_is_largest_first_and_placement_backtracks() -> None:
    # 3g.40gb@0 leaves 4..7, where 2g.20gb@4 leaves only slice 6 for two 1g.10gb (a 1g cannot
    # start at 7): the planner must move the 3g to slice 4.
    plan = plan_layout(H100_80GB, {"1g.10gb": 2, "2g.20gb": 1, "3g.40gb": 1}, [])
    assert plan.create == (
        Placement(profile_id=9, start=4, size=4),
        Placement(profile_id=14, start=0, size=2),
        Placement(profile_id=19, start=2, size=1),
        Placement(profile_id=19, start=3, size=1),
    )


def test_the_same_request_always_gives_the_same_plan() -> None:
    desired = {"1g.10gb": 2, "2g.20gb": 1, "3g.40gb": 1}
    plans = {plan_layout(H100_80GB, dict(reversed(desired.items())), []) for _ in range(3)}
    plans.add(plan_layout(H100_80GB, desired, []))
    assert len(plans) == 1


def test_a_pinned_instance_of_an_unwanted_profile_blocks_the_layout() -> None:
    existing = [Instance(gi_id=4, profile_id=14, start=0, size=2)]
    with pytest.raises(LayoutError) as raised:
        plan_layout(H100_80GB, {"7g.80gb": 1}, existing, pinned={4})
    message = str(raised.value)
    assert "pinned GPU instance 4 (2g.20gb at memory slice 0) blocks it" in message
    assert "has no 2g.20gb" in message


def test_the_pinned_instance_in_the_way_is_named_not_the_others() -> None:
    # 4g.40gb can only start at slice 0, where pinned GI 1 sits; pinned GI 2 at slice 4 is fine.
    existing = [
        Instance(gi_id=1, profile_id=19, start=0, size=1),
        Instance(gi_id=2, profile_id=19, start=4, size=1),
    ]
    with pytest.raises(LayoutError) as raised:
        plan_layout(H100_80GB, {"1g.10gb": 2, "4g.40gb": 1}, existing, pinned=[1, 2])
    message = str(raised.value)
    assert "pinned GPU instance 1 (1g.10gb at memory slice 0) blocks it" in message
    assert "instance 2 " not in message
    # Unpinned, the same instance is simply moved.
    plan = plan_layout(H100_80GB, {"1g.10gb": 2, "4g.40gb": 1}, existing, pinned=[2])
    assert [i.gi_id for i in plan.keep] == [2]
    assert [i.gi_id for i in plan.destroy] == [1]


def test_more_pinned_instances_than_wanted_are_named() -> None:
    existing = [
        Instance(gi_id=1, profile_id=9, start=0, size=4),
        Instance(gi_id=2, profile_id=9, start=4, size=4),
    ]
    with pytest.raises(LayoutError, match=r"pinned GPU instances 1 .*, 2 .* block it"):
        plan_layout(H100_80GB, {"3g.40gb": 1}, existing, pinned=[1, 2])


def test_a_pinned_instance_on_a_bad_placement_is_refused() -> None:
    existing = [Instance(gi_id=3, profile_id=19, start=7, size=1)]
    with pytest.raises(LayoutError, match=re.escape("not one 1g.10gb allows")):
        plan_layout(H100_80GB, {"1g.10gb": 1}, existing, pinned=[3])


def test_pinning_an_instance_that_does_not_exist_is_refused() -> None:
    with pytest.raises(LayoutError, match="pinned GPU instance 8 does not exist"):
        plan_layout(H100_80GB, {"1g.10gb": 1}, [], pinned=[8])


def test_an_existing_list_naming_a_gi_twice_is_refused() -> None:
    existing = [
        Instance(gi_id=1, profile_id=19, start=0, size=1),
        Instance(gi_id=1, profile_id=19, start=1, size=1),
    ]
    with pytest.raises(LayoutError, match="lists GPU instance 1 twice"):
        plan_layout(H100_80GB, {"1g.10gb": 2}, existing)


def test_overlapping_pinned_instances_are_reported_as_an_inconsistent_read() -> None:
    existing = [
        Instance(gi_id=1, profile_id=9, start=0, size=4),
        Instance(gi_id=2, profile_id=14, start=2, size=2),
    ]
    with pytest.raises(LayoutError, match="inconsistent"):
        plan_layout(H100_80GB, {"3g.40gb": 1, "2g.20gb": 1}, existing, pinned=[1, 2])
    # Unpinned, only one of the two overlapping instances can be kept.
    plan = plan_layout(H100_80GB, {"3g.40gb": 1, "2g.20gb": 1}, existing)
    assert len(plan.keep) == 1
