"""The vNPU planner, pure: which vNPUs it keeps, destroys and creates, and what it refuses.

The property tests check every plan against an independent statement of the capacity rules
(docs/dcmi-sim.md "Capacity"), written out here rather than taken from the planner.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import LayoutError
from agent.hw.ascend.planner import VnpuPlan, layout_text, plan_vnpus
from agent.hw.ascend.templates import MODELS, NpuCapacity, NpuModel, VnpuTemplate
from agent.hw.model import InstanceInfo

A910 = MODELS["910A"]
B910 = MODELS["910B3"]
B910_4 = MODELS["910B4"]


def vnpu(vdev_id: int, template: str) -> InstanceInfo:
    return InstanceInfo(
        uuid=f"vNPU-test-{vdev_id}", gpu_instance_id=vdev_id, compute_instance_id=None,
        profile_id=0, profile=template, placement_start=0, placement_size=0, memory_bytes=0,
    )  # fmt: skip


def plan(
    model: NpuModel,
    existing: Sequence[InstanceInfo],
    desired: Mapping[str, int],
    pinned: Sequence[int] = (),
) -> VnpuPlan:
    return plan_vnpus(
        model.capacity, model.templates, list(existing), desired, pinned=pinned, label="NPU 0"
    )


def ids(instances: Sequence[InstanceInfo]) -> list[int]:
    return [instance.gpu_instance_id for instance in instances]


def names(templates: Sequence[VnpuTemplate]) -> list[str]:
    return [template.name for template in templates]


# --- cases -------------------------------------------------------------------------------------


def test_an_empty_layout_destroys_every_vnpu_the_npu_is_used_whole() -> None:
    result = plan(A910, [vnpu(101, "vir08"), vnpu(100, "vir16")], {})
    assert (ids(result.keep), ids(result.destroy), result.create) == ([], [100, 101], ())
    assert result.mutations == 2


def test_a_layout_the_chip_already_has_is_an_empty_plan() -> None:
    existing = [vnpu(100, "vir16"), vnpu(101, "vir08"), vnpu(102, "vir08")]
    result = plan(A910, existing, {"vir08": 2, "vir16": 1, "vir04": 0})
    assert ids(result.keep) == [100, 101, 102]
    assert result.is_noop
    assert result.mutations == 0
    assert plan(A910, [], {}).is_noop


def test_it_keeps_the_lowest_vdev_ids_of_a_template_and_destroys_the_rest() -> None:
    existing = [vnpu(102, "vir08"), vnpu(100, "vir08"), vnpu(101, "vir08")]
    result = plan(A910, existing, {"vir08": 2})
    assert (ids(result.keep), ids(result.destroy), result.create) == ([100, 101], [102], ())


def test_it_keeps_what_is_still_wanted_and_creates_the_rest_largest_first() -> None:
    existing = [vnpu(100, "vir16"), vnpu(101, "vir08")]
    result = plan(A910, existing, {"vir02": 1, "vir08": 2, "vir04": 1})
    assert ids(result.keep) == [101]
    assert ids(result.destroy) == [100]
    assert names(result.create) == ["vir08", "vir04", "vir02"]
    assert result.mutations == 4


def test_sixteen_vir02_fit_a_910_whose_ai_cpus_are_not_counted() -> None:
    # 16 x 1 AI CPU would exceed the 14 if they were counted (MindCluster allows 16).
    assert len(plan(A910, [], {"vir02": 16}).create) == 16


@pytest.mark.parametrize(
    ("model", "desired", "message"),
    [
        (A910, {"vir16": 3}, "NPU 0 (Ascend 910A): vir16=3 needs 48 AI Cores, the chip has 32"),
        (
            A910,
            {"vir16": 1, "vir08": 2, "vir02": 1},
            "NPU 0 (Ascend 910A): vir16=1,vir08=2,vir02=1 needs 34 AI Cores, the chip has 32",
        ),
        (A910, {"vir02": 17},
         "NPU 0 (Ascend 910A): vir02=17 is 17 vNPUs, the chip takes at most 16"),
        (
            B910_4,
            {"vir10_4c_16g_m": 2},
            "NPU 0 (Ascend 910B4): vir10_4c_16g_m=2 needs 8 AI CPUs, the chip has 7",
        ),
        (
            B910,
            {"vir32": 1},
            "NPU 0 (Ascend 910B3): unknown vNPU template 'vir32'; this chip offers "
            "vir10_3c_32g, vir05_1c_16g",
        ),
        (
            A910,
            {"vir10_3c_32g": 1},
            "NPU 0 (Ascend 910A): unknown vNPU template 'vir10_3c_32g'; this chip offers "
            "vir02, vir04, vir08, vir16",
        ),
        (A910, {"vir08": -1}, "NPU 0 (Ascend 910A): the count of vir08 must be a non-negative "
                              "integer, not -1"),
        (A910, {"vir08": True}, "NPU 0 (Ascend 910A): the count of vir08 must be a non-negative "
                                "integer, not True"),
        (A910, {"vir08": "2"}, "NPU 0 (Ascend 910A): the count of vir08 must be a non-negative "
                               "integer, not '2'"),
    ],
)  # fmt: skip
def test_a_layout_that_cannot_fit_is_refused_in_one_line(
    model: NpuModel, desired: dict[str, int], message: str
) -> None:
    with pytest.raises(LayoutError) as caught:
        plan(model, [vnpu(100, "vir16")] if model is A910 else [], desired)
    assert str(caught.value) == message
    assert "\n" not in str(caught.value)


def test_a_memory_shortfall_is_named() -> None:
    # The real tables give memory in proportion to AI Cores, so memory never runs out first
    # there; a chip with less memory than its cores' share shows the rule.
    capacity = NpuCapacity("test", aicore=32, aicpu=14, memory_mb=10000)
    template = VnpuTemplate("big", 8, 1, 6000, counts_aicpu=False)
    with pytest.raises(LayoutError, match=r"^Ascend test: big=2 needs 12000 MB of memory, "
                                          r"the chip has 10000 MB$"):  # fmt: skip
        plan_vnpus(capacity, [template], [], {"big": 2})


def test_a_huge_count_is_refused_without_building_it() -> None:
    with pytest.raises(LayoutError, match="is 1000000000000 vNPUs"):
        plan(A910, [], {"vir02": 10**12})


def test_a_pinned_vnpu_is_kept_before_a_lower_unpinned_one() -> None:
    existing = [vnpu(100, "vir08"), vnpu(101, "vir08")]
    result = plan(A910, existing, {"vir08": 1}, pinned=[101])
    assert (ids(result.keep), ids(result.destroy)) == ([101], [100])


def test_a_layout_that_would_destroy_a_pinned_vnpu_is_refused() -> None:
    existing = [vnpu(100, "vir08"), vnpu(101, "vir16")]
    with pytest.raises(LayoutError) as caught:
        plan(A910, existing, {"vir08": 2}, pinned=[101])
    assert str(caught.value) == (
        "NPU 0 (Ascend 910A): vir08=2 has no room for vNPU 101 (vir16), which is pinned "
        "(leased or not yet scrubbed); release it first"
    )
    with pytest.raises(LayoutError, match="no vNPUs has no room for vNPU 100"):
        plan(A910, existing, {}, pinned=[100])


def test_a_pinned_id_the_chip_does_not_have_is_refused() -> None:
    with pytest.raises(LayoutError, match="pinned vNPU 105 is not on the chip"):
        plan(A910, [vnpu(100, "vir08")], {"vir08": 1}, pinned=[105])


def test_an_existing_vnpu_of_a_template_the_table_lacks_is_destroyed() -> None:
    result = plan(A910, [vnpu(100, "vir01_old"), vnpu(101, "vir04")], {"vir04": 1})
    assert (ids(result.keep), ids(result.destroy), result.create) == ([101], [100], ())


def test_layout_text() -> None:
    assert layout_text({"vir16": 1, "vir08": 0, "vir02": 2}) == "vir16=1,vir02=2"
    assert layout_text({}) == "no vNPUs"


# --- properties --------------------------------------------------------------------------------


def fits(capacity: NpuCapacity, vnpus: Sequence[VnpuTemplate]) -> bool:
    """docs/dcmi-sim.md "Capacity", stated independently of the planner."""
    counted = [t.aicpu for t in vnpus if capacity.counts_aicpu and t.counts_aicpu]
    return (
        len(vnpus) <= capacity.max_vnpus
        and sum(t.aicore for t in vnpus) <= capacity.aicore
        and sum(t.memory_mb for t in vnpus) <= capacity.memory_mb
        and sum(counted) <= capacity.aicpu
    )


@st.composite
def scenarios(
    draw: st.DrawFn,
) -> tuple[NpuModel, list[InstanceInfo], dict[str, int], list[int]]:
    model = draw(st.sampled_from(list(MODELS.values())))
    # Existing vNPUs: a layout the chip could hold, added one by one while it fits.
    existing: list[VnpuTemplate] = []
    for template in draw(st.lists(st.sampled_from(model.templates), max_size=18)):
        if fits(model.capacity, [*existing, template]):
            existing.append(template)
    vdev_ids = draw(st.permutations(range(100, 116)))[: len(existing)]
    instances = [vnpu(i, t.name) for i, t in zip(vdev_ids, existing, strict=True)]
    desired = draw(
        st.dictionaries(st.sampled_from([t.name for t in model.templates]), st.integers(0, 17))
    )
    pinned = draw(st.lists(st.sampled_from(vdev_ids), unique=True)) if vdev_ids else []
    return model, instances, desired, pinned


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_any_plan_fits_the_chip_keeps_the_most_and_applies_idempotently(
    scenario: tuple[NpuModel, list[InstanceInfo], dict[str, int], list[int]],
) -> None:
    model, existing, desired, pinned = scenario
    by_name = {t.name: t for t in model.templates}
    wanted = [by_name[name] for name, count in desired.items() for _ in range(count)]
    try:
        result = plan(model, existing, desired, pinned)
    except LayoutError as error:
        message = str(error)
        assert "\n" not in message
        if fits(model.capacity, wanted):
            # Only a pinned vNPU the layout has no room for may block a layout that fits.
            have = Counter(i.profile for i in existing if i.gpu_instance_id in pinned)
            assert any(count > desired.get(name, 0) for name, count in have.items()), message
            assert "pinned" in message
        return
    assert fits(model.capacity, wanted)
    # keep and destroy split the existing vNPUs; pinned ones are all kept.
    assert sorted(ids(result.keep) + ids(result.destroy)) == sorted(ids(existing))
    assert set(pinned) <= set(ids(result.keep))
    # The result is exactly the layout, and everything still wanted was kept.
    final = Counter(i.profile for i in result.keep) + Counter(names(result.create))
    assert final == Counter({name: count for name, count in desired.items() if count})
    have = Counter(i.profile for i in existing)
    for name in by_name:
        kept = [i for i in result.keep if i.profile == name]
        assert len(kept) == min(have[name], desired.get(name, 0))
        if not pinned:
            lowest = sorted(i.gpu_instance_id for i in existing if i.profile == name)
            assert ids(kept) == lowest[: len(kept)]
    # Applied, the same layout plans nothing.
    applied = [*result.keep, *(vnpu(200 + n, t.name) for n, t in enumerate(result.create))]
    assert plan(model, applied, desired, pinned).mutations == 0


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(MODELS.values())), st.data())
def test_a_layout_already_in_place_makes_zero_mutations(
    model: NpuModel, data: st.DataObject
) -> None:
    layout: list[VnpuTemplate] = []
    for template in data.draw(st.lists(st.sampled_from(model.templates), max_size=18)):
        if fits(model.capacity, [*layout, template]):
            layout.append(template)
    existing = [vnpu(100 + n, t.name) for n, t in enumerate(layout)]
    desired = dict(Counter(t.name for t in layout))
    assert plan(model, existing, desired).mutations == 0
