"""vNPU templates, ids, capacity, destruction, queries and simulated memory placement.

The explicit cases are the documented examples; ``test_matches_the_reference_model`` checks
every sequence Hypothesis finds against a plain Python reading of the same rules.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.dcmisim import dcmi
from tests.dcmisim.conftest import MakeNode
from tests.dcmisim.dcmi import (
    DCMI_OK,
    DEVICE_NOT_EXIST,
    INVALID_PARAMETER,
    VDEV_ID_ALL,
    SimNode,
    create,
    destroy,
    free_resource,
    query,
    total_resource,
    units,
    vnpu_ids,
)


def test_two_vir08_on_a_910_take_the_first_ids_and_add_up(node910: SimNode) -> None:
    lib = node910.lib
    assert create(lib, 0, b"vir08") == (DCMI_OK, 100)
    assert create(lib, 0, b"vir08") == (DCMI_OK, 101)
    total = total_resource(lib, 0)
    assert (total.vdev_num, list(total.vdev_id[:2])) == (2, [100, 101])
    assert (total.computing.aic, total.computing.memory_size) == (32.0, 32768)
    free = free_resource(lib, 0)
    assert (free.computing.aic, free.computing.memory_size) == (16.0, 16384)
    for vdev_id in (100, 101):
        code, answer = query(lib, 0, vdev_id)
        assert code == DCMI_OK
        info = answer.query_info
        assert (info.name, info.computing.aic, info.computing.memory_size) == (b"vir08", 8.0, 8192)
        assert info.computing.device_aicpu == 3
        assert info.vfid == vdev_id - 100 + 1
    # The other chips are untouched.
    assert all(vnpu_ids(lib, card) == [] for card in range(1, 8))


def test_a_910_fills_up_with_mixed_templates_and_refuses_one_more(node910: SimNode) -> None:
    lib = node910.lib
    for template in (b"vir16", b"vir08", b"vir04", b"vir02", b"vir02"):
        assert create(lib, 2, template)[0] == DCMI_OK
    before = node910.state()
    assert create(lib, 2, b"vir02") == (INVALID_PARAMETER, 0)
    assert node910.state() == before
    assert free_resource(lib, 2).computing.aic == 0.0


def test_a_30_core_910_cannot_hold_two_vir16(make_node: MakeNode) -> None:
    # MindCluster's guide: with 30 AI Cores "only one vir16", the rest as vir08 + vir04 + vir02.
    lib = make_node(dcmi.topology("910ProB", 1)).lib
    assert create(lib, 0, b"vir16")[0] == DCMI_OK
    assert create(lib, 0, b"vir16")[0] == INVALID_PARAMETER
    for template in (b"vir08", b"vir04", b"vir02"):
        assert create(lib, 0, template)[0] == DCMI_OK
    assert create(lib, 0, b"vir02")[0] == INVALID_PARAMETER


def test_a_910_holds_at_most_sixteen_vnpus(node910: SimNode) -> None:
    lib = node910.lib
    assert [create(lib, 5, b"vir02") for _ in range(16)] == [
        (DCMI_OK, 100 + 5 * 16 + k) for k in range(16)
    ]
    assert create(lib, 5, b"vir02")[0] == INVALID_PARAMETER


def test_910b_templates_name_ai_cpus_and_memory(node910b: SimNode) -> None:
    lib = node910b.lib
    assert create(lib, 0, b"vir10_3c_32g") == (DCMI_OK, 100)
    code, answer = query(lib, 0, 100)
    computing = answer.query_info.computing
    assert code == DCMI_OK
    assert (computing.aic, computing.device_aicpu, computing.memory_size) == (10.0, 3, 32768)
    assert create(lib, 0, b"vir05_1c_16g") == (DCMI_OK, 101)
    assert create(lib, 0, b"vir05_1c_16g") == (DCMI_OK, 102)
    assert create(lib, 0, b"vir05_1c_16g")[0] == INVALID_PARAMETER
    free = free_resource(lib, 0)
    assert (free.computing.aic, free.computing.device_aicpu, free.computing.memory_size) == (
        0.0,
        2,
        0,
    )


def test_ai_cpus_are_a_capacity_where_templates_name_them(make_node: MakeNode) -> None:
    # 910B4: 20 AI Cores and 7 AI CPUs; two vir10_4c_16g_m need 20 cores but 8 AI CPUs.
    lib = make_node(dcmi.topology("910B4", 1)).lib
    assert create(lib, 0, b"vir10_4c_16g_m")[0] == DCMI_OK
    assert create(lib, 0, b"vir10_4c_16g_m")[0] == INVALID_PARAMETER
    assert create(lib, 0, b"vir10_3c_16g")[0] == DCMI_OK


@pytest.mark.parametrize(
    ("preset", "template"),
    [
        ("ascend910bx8", b"vir08"),  # a 910 template on a 910B
        ("ascend910x8", b"vir10_3c_32g"),  # a 910B template on a 910
        ("ascend910x8", b"vir32"),
        ("ascend910x8", b""),
        ("ascend910x8", b"VIR08"),
    ],
)
def test_templates_the_chip_lacks_are_refused(
    make_node: MakeNode, preset: str, template: bytes
) -> None:
    node = make_node(preset=preset)
    before = node.state()
    assert create(node.lib, 0, template) == (INVALID_PARAMETER, 0)
    assert node.state() == before


def test_a_template_name_without_its_terminating_nul_is_refused(node910: SimNode) -> None:
    request = dcmi.CreateVdevRes(vdev_id=dcmi.VDEV_ID_AUTO, vfg_id=dcmi.VDEV_ID_AUTO)
    ctypes.memmove(ctypes.addressof(request) + 8, b"vir08" + b"x" * 27, 32)
    out = dcmi.CreateVdevOut()
    code = node910.lib.dcmi_create_vdevice(0, 0, ctypes.byref(request), ctypes.byref(out))
    assert code == INVALID_PARAMETER


def test_vnpu_ids_follow_the_chips_physical_id(make_node: MakeNode) -> None:
    # The driver numbers vNPU k of physical chip p as 100 + 16 * p + k (a 910B3 vNPU on chip 5 is
    # device 180, e.g. "Ascend910-5c.1cpu.16g-180-5" in HAMi's device-plugin logs).
    lib = make_node("npu 0 910B3 card=0 phy=5\nnpu 1 910B3 card=1 phy=0\n").lib
    assert create(lib, 0, b"vir05_1c_16g") == (DCMI_OK, 180)
    assert create(lib, 1, b"vir05_1c_16g") == (DCMI_OK, 100)


def test_a_requested_vdev_id_is_used_when_free_and_in_the_chips_range(node910: SimNode) -> None:
    lib = node910.lib
    assert create(lib, 1, b"vir04", vdev_id=120) == (DCMI_OK, 120)
    assert create(lib, 1, b"vir04", vdev_id=120) == (INVALID_PARAMETER, 0)  # taken
    assert create(lib, 1, b"vir04", vdev_id=100) == (INVALID_PARAMETER, 0)  # chip 0's range
    assert create(lib, 1, b"vir04", vdev_id=132) == (INVALID_PARAMETER, 0)  # chip 2's range
    assert create(lib, 1, b"vir04", vdev_id=7) == (INVALID_PARAMETER, 0)
    assert create(lib, 1, b"vir04") == (DCMI_OK, 116)  # auto: the lowest free


def test_destroy_frees_the_id_and_the_capacity(node910: SimNode) -> None:
    lib = node910.lib
    for _ in range(2):
        assert create(lib, 0, b"vir16")[0] == DCMI_OK
    assert destroy(lib, 0, 100) == DCMI_OK
    assert vnpu_ids(lib, 0) == [101]
    assert destroy(lib, 0, 100) == DEVICE_NOT_EXIST
    assert create(lib, 0, b"vir08") == (DCMI_OK, 100)
    assert create(lib, 0, b"vir08") == (DCMI_OK, 102)


def test_destroy_refuses_other_chips_vnpus_and_ids_out_of_range(node910: SimNode) -> None:
    lib = node910.lib
    assert create(lib, 1, b"vir08") == (DCMI_OK, 116)
    before = node910.state()
    assert destroy(lib, 0, 116) == INVALID_PARAMETER  # chip 1's vNPU, asked of chip 0
    assert destroy(lib, 0, 117) == DEVICE_NOT_EXIST  # chip 1's range, nothing there
    for vdev_id in (0, 5, 99, 100 + 64 * 16, 0xFFFFFFFF):
        assert destroy(lib, 0, vdev_id) == INVALID_PARAMETER
    assert node910.state() == before


def test_destroy_0xffff_destroys_every_vnpu_of_the_chip(node910: SimNode) -> None:
    lib = node910.lib
    assert destroy(lib, 3, VDEV_ID_ALL) == DCMI_OK  # none: still success (driver behaviour)
    for template in (b"vir02", b"vir04", b"vir08"):
        assert create(lib, 3, template)[0] == DCMI_OK
    assert create(lib, 4, b"vir02")[0] == DCMI_OK
    assert destroy(lib, 3, VDEV_ID_ALL) == DCMI_OK
    assert vnpu_ids(lib, 3) == []
    assert vnpu_ids(lib, 4) == [164]


def test_query_of_a_vnpu_the_chip_does_not_have(node910: SimNode) -> None:
    assert create(node910.lib, 0, b"vir02")[0] == DCMI_OK
    assert query(node910.lib, 1, 100)[0] == DEVICE_NOT_EXIST
    assert query(node910.lib, 0, 101)[0] == DEVICE_NOT_EXIST
    assert query(node910.lib, 0, 100)[0] == DCMI_OK


def test_vnpus_own_memory_units_in_placement_order(node910: SimNode) -> None:
    lib = node910.lib
    assert create(lib, 0, b"vir08") == (DCMI_OK, 100)
    assert create(lib, 0, b"vir08") == (DCMI_OK, 101)
    assert units(lib, 0, 100) == (DCMI_OK, 0xFF, 32)
    assert units(lib, 0, 101) == (DCMI_OK, 0xFF00, 32)
    assert destroy(lib, 0, 100) == DCMI_OK
    # The next vNPU lands on the first free run: the bytes the destroyed one left behind.
    assert create(lib, 0, b"vir04") == (DCMI_OK, 100)
    assert units(lib, 0, 100) == (DCMI_OK, 0xF, 32)
    assert units(lib, 0, 102) == (DEVICE_NOT_EXIST, 0, 0)


def test_a_fragmented_chip_still_takes_a_vnpu_that_fits_by_count(node910: SimNode) -> None:
    lib = node910.lib
    for _ in range(8):
        assert create(lib, 0, b"vir04")[0] == DCMI_OK
    for vdev_id in (101, 103):
        assert destroy(lib, 0, vdev_id) == DCMI_OK
    assert create(lib, 0, b"vir08") == (DCMI_OK, 101)
    assert units(lib, 0, 101) == (DCMI_OK, 0xF0 | 0xF000, 32)


# ---- the reference model -------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    aicore: int
    aicpu: int
    counted: bool


@dataclass(frozen=True)
class Chip:
    aicore: int
    aicpu: int
    hbm: int
    templates: dict[str, Template]


T910 = {
    "vir02": Template(2, 1, False),
    "vir04": Template(4, 1, False),
    "vir08": Template(8, 3, False),
    "vir16": Template(16, 7, False),
}
CHIPS = {
    "910ProB": Chip(30, 14, 32768, T910),
    "910B4": Chip(
        20,
        7,
        32768,
        {
            "vir10_3c_16g": Template(10, 3, True),
            "vir10_4c_16g_m": Template(10, 4, True),
            "vir10_3c_16g_nm": Template(10, 3, True),
            "vir05_1c_8g": Template(5, 1, True),
        },
    ),
}
MODEL_TOPOLOGY = "npu 0 910ProB card=0 phy=2\nnpu 1 910B4 card=1 phy=0\n"
MODEL_CHIPS = [("910ProB", 2), ("910B4", 0)]  # (model, physical id) by card


@dataclass
class ReferenceChip:
    chip: Chip
    phy: int
    vnpus: dict[int, tuple[str, int]] = field(default_factory=dict)  # slot -> (template, units)

    def first_id(self) -> int:
        return 100 + 16 * self.phy

    def used_units(self) -> int:
        mask = 0
        for _, owned in self.vnpus.values():
            mask |= owned
        return mask

    def place(self, count: int) -> int:
        free = ((1 << self.chip.aicore) - 1) & ~self.used_units()
        run = (1 << count) - 1
        for start in range(self.chip.aicore - count + 1):
            if (free >> start) & run == run:
                return run << start
        picked = 0
        for unit in range(self.chip.aicore):
            if count and (free >> unit) & 1:
                picked |= 1 << unit
                count -= 1
        return picked

    def create(self, name: str, requested: int | None) -> tuple[int, int]:
        template = self.chip.templates.get(name)
        if template is None:
            return INVALID_PARAMETER, 0
        if requested is None:
            free_slots = [k for k in range(16) if k not in self.vnpus]
            slot = free_slots[0] if free_slots else None
        else:
            slot = requested - self.first_id()
            if not 0 <= slot < 16 or slot in self.vnpus:
                slot = None
        if slot is None:
            return INVALID_PARAMETER, 0
        used = [self.chip.templates[t] for t, _ in self.vnpus.values()]
        cores = sum(t.aicore for t in used) + template.aicore
        cpus = sum(t.aicpu for t in used if t.counted) + (template.aicpu if template.counted else 0)
        if cores > self.chip.aicore or cpus > self.chip.aicpu:
            return INVALID_PARAMETER, 0
        self.vnpus[slot] = (name, self.place(template.aicore))
        return DCMI_OK, self.first_id() + slot


class Reference:
    def __init__(self) -> None:
        self.chips = [ReferenceChip(CHIPS[model], phy) for model, phy in MODEL_CHIPS]

    def destroy(self, card: int, vdev_id: int) -> int:
        chip = self.chips[card]
        if vdev_id == VDEV_ID_ALL:
            chip.vnpus.clear()
            return DCMI_OK
        if not 100 <= vdev_id <= 100 + 64 * 16 - 1:
            return INVALID_PARAMETER
        slot = vdev_id - chip.first_id()
        if 0 <= slot < 16:
            return DCMI_OK if chip.vnpus.pop(slot, None) is not None else DEVICE_NOT_EXIST
        for other in self.chips:
            if vdev_id - other.first_id() in other.vnpus:
                return INVALID_PARAMETER
        return DEVICE_NOT_EXIST


TEMPLATE_NAMES = sorted({name for chip in CHIPS.values() for name in chip.templates} | {"vir32"})
# Ids around both chips' ranges (physical ids 2 and 0) and the destroy-all id.
VDEV_IDS = st.sampled_from([VDEV_ID_ALL, 99, 100, 101, 115, 116, 131, 132, 133, 147, 148, 5000])
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(
            st.just("create"),
            st.integers(0, 1),
            st.sampled_from(TEMPLATE_NAMES),
            st.none() | VDEV_IDS,
        ),
        st.tuples(st.just("destroy"), st.integers(0, 1), VDEV_IDS, st.none()),
    ),
    max_size=40,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(operations=OPERATIONS)
def test_matches_the_reference_model(
    make_node: MakeNode, operations: list[tuple[str, int, object, int | None]]
) -> None:
    node = make_node(MODEL_TOPOLOGY)
    lib = node.lib
    reference = Reference()
    calls = node.counter()
    for kind, card, argument, requested in operations:
        if kind == "create":
            assert isinstance(argument, str)
            vdev_id = dcmi.VDEV_ID_AUTO if requested is None else requested
            assert create(lib, card, argument.encode(), vdev_id) == reference.chips[card].create(
                argument, requested
            )
        else:
            assert isinstance(argument, int)
            assert destroy(lib, card, argument) == reference.destroy(card, argument)
        calls += 1
        assert node.counter() == calls
    for card, chip in enumerate(reference.chips):
        assert vnpu_ids(lib, card) == sorted(chip.first_id() + slot for slot in chip.vnpus)
        for slot, (_, owned) in chip.vnpus.items():
            assert units(lib, card, chip.first_id() + slot) == (DCMI_OK, owned, chip.chip.aicore)
        free = free_resource(lib, card)
        cores = [chip.chip.templates[name].aicore for name, _ in chip.vnpus.values()]
        # A vNPU's memory is the chip's HBM in proportion to its AI Cores, rounded down.
        memory = sum(chip.chip.hbm * count // chip.chip.aicore for count in cores)
        assert free.computing.aic == float(chip.chip.aicore - sum(cores))
        assert free.computing.memory_size == chip.chip.hbm - memory
