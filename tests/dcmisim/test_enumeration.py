"""Cards, chips, id mappings, chip identity and memory of the simulated 8x910 and 8x910B nodes."""

from __future__ import annotations

import ctypes

import pytest

from tests.dcmisim import dcmi
from tests.dcmisim.conftest import MakeNode
from tests.dcmisim.dcmi import (
    DCMI_OK,
    DEVICE_NOT_EXIST,
    INVALID_DEVICE_ID,
    INVALID_PARAMETER,
    NDIE,
    NOT_SUPPORT,
    VDIE,
    SimNode,
)

# (model, AI Cores, HBM MB, DDR MB or None when the memory-info calls are not supported)
NODES = {
    "ascend910x8": ("910A", 32, 32768, 16384),
    "ascend910bx8": ("910B3", 20, 65536, None),
}


def chip_info(lib: ctypes.CDLL, card: int) -> dcmi.ChipInfoV2:
    info = dcmi.ChipInfoV2()
    assert lib.dcmi_get_device_chip_info_v2(card, 0, ctypes.byref(info)) == DCMI_OK
    return info


@pytest.mark.parametrize("preset", sorted(NODES))
def test_an_eight_npu_node_lists_eight_cards_of_one_chip_each(
    make_node: MakeNode, preset: str
) -> None:
    model, aicore, hbm, ddr = NODES[preset]
    lib = make_node(preset=preset).lib
    assert dcmi.card_list(lib) == (DCMI_OK, list(range(8)))
    for card in range(8):
        count = ctypes.c_int(-1)
        assert lib.dcmi_get_device_num_in_card(card, ctypes.byref(count)) == DCMI_OK
        assert count.value == 1
        most, mcu, cpu = ctypes.c_int(-9), ctypes.c_int(-9), ctypes.c_int(-9)
        assert (
            lib.dcmi_get_device_id_in_card(
                card, ctypes.byref(most), ctypes.byref(mcu), ctypes.byref(cpu)
            )
            == DCMI_OK
        )
        assert (most.value, mcu.value, cpu.value) == (1, -1, -1)
        unit_type = ctypes.c_int(-1)
        assert lib.dcmi_get_device_type(card, 0, ctypes.byref(unit_type)) == DCMI_OK
        assert unit_type.value == 0  # NPU_TYPE
        info = chip_info(lib, card)
        expected = (b"Ascend", model.encode(), aicore)
        assert (info.chip_type, info.chip_name, info.aicore_cnt) == expected
        assert info.npu_name == model.encode()
        hbm_info = dcmi.HbmInfo()
        assert lib.dcmi_get_device_hbm_info(card, 0, ctypes.byref(hbm_info)) == DCMI_OK
        assert (hbm_info.memory_size, hbm_info.memory_usage) == (hbm, 0)
        memory = dcmi.MemoryInfo()
        memory_v3 = dcmi.MemoryInfoV3()
        code = lib.dcmi_get_memory_info(card, 0, ctypes.byref(memory))
        code_v3 = lib.dcmi_get_device_memory_info_v3(card, 0, ctypes.byref(memory_v3))
        if ddr is None:
            assert (code, code_v3) == (NOT_SUPPORT, NOT_SUPPORT)
        else:
            assert (code, code_v3) == (DCMI_OK, DCMI_OK)
            assert memory.memory_size == memory_v3.memory_size == ddr


def test_the_v1_chip_info_matches_v2(node910b: SimNode) -> None:
    info = dcmi.ChipInfo()
    assert node910b.lib.dcmi_get_device_chip_info(3, 0, ctypes.byref(info)) == DCMI_OK
    v2 = chip_info(node910b.lib, 3)
    assert (info.chip_type, info.chip_name, info.chip_ver, info.aicore_cnt) == (
        v2.chip_type,
        v2.chip_name,
        v2.chip_ver,
        v2.aicore_cnt,
    )


def test_the_old_card_list_name_answers_like_the_new_one(node910: SimNode) -> None:
    count = ctypes.c_int(-1)
    cards = (ctypes.c_int * 8)()
    assert node910.lib.dcmi_get_card_num_list(ctypes.byref(count), cards, 8) == DCMI_OK
    assert list(cards) == list(range(8))


def test_a_card_list_too_short_for_every_card_is_refused(node910: SimNode) -> None:
    count = ctypes.c_int(-1)
    cards = (ctypes.c_int * 7)()
    assert node910.lib.dcmi_get_card_list(ctypes.byref(count), cards, 7) == INVALID_PARAMETER


def test_the_topology_file_may_give_card_and_physical_ids(make_node: MakeNode) -> None:
    node = make_node("npu 0 910B3 card=4 phy=6\nnpu 1 910B2 phy=3 card=9 # note\n\nnpu 2 910B4\n")
    lib = node.lib
    assert dcmi.card_list(lib) == (DCMI_OK, [4, 9, 2])
    for card, (logic, phy) in {4: (0, 6), 9: (1, 3), 2: (2, 2)}.items():
        logic_id = ctypes.c_int(-1)
        assert lib.dcmi_get_device_logic_id(ctypes.byref(logic_id), card, 0) == DCMI_OK
        assert logic_id.value == logic
        phy_id = ctypes.c_uint(99)
        assert lib.dcmi_get_device_phyid_from_logicid(logic, ctypes.byref(phy_id)) == DCMI_OK
        assert phy_id.value == phy
        back = ctypes.c_uint(99)
        assert lib.dcmi_get_device_logicid_from_phyid(phy, ctypes.byref(back)) == DCMI_OK
        assert back.value == logic
        for function, argument in (
            (lib.dcmi_get_card_id_device_id_from_logicid, logic),
            (lib.dcmi_get_card_id_device_id_from_phyid, phy),
        ):
            found_card, found_device = ctypes.c_int(-1), ctypes.c_int(-1)
            assert (
                function(ctypes.byref(found_card), ctypes.byref(found_device), argument) == DCMI_OK
            )
            assert (found_card.value, found_device.value) == (card, 0)
    assert [chip_info(lib, card).chip_name for card in (4, 9, 2)] == [b"910B3", b"910B2", b"910B4"]


def test_unknown_logic_and_physical_ids_are_refused(node910b: SimNode) -> None:
    lib = node910b.lib
    out = ctypes.c_uint(0)
    assert lib.dcmi_get_device_phyid_from_logicid(8, ctypes.byref(out)) == INVALID_DEVICE_ID
    assert lib.dcmi_get_device_logicid_from_phyid(8, ctypes.byref(out)) == INVALID_DEVICE_ID
    card, device = ctypes.c_int(0), ctypes.c_int(0)
    assert (
        lib.dcmi_get_card_id_device_id_from_logicid(ctypes.byref(card), ctypes.byref(device), 8)
        == DEVICE_NOT_EXIST
    )
    assert (
        lib.dcmi_get_card_id_device_id_from_phyid(ctypes.byref(card), ctypes.byref(device), 99)
        == DEVICE_NOT_EXIST
    )


def die_id(lib: ctypes.CDLL, card: int, kind: int) -> tuple[int, list[int]]:
    die = dcmi.DieId()
    code = lib.dcmi_get_device_die_v2(card, 0, kind, ctypes.byref(die))
    return code, list(die.soc_die)


def test_die_ids_name_a_chip_stably_and_distinctly(node910: SimNode, make_node: MakeNode) -> None:
    first = [die_id(node910.lib, card, VDIE) for card in range(8)]
    assert all(code == DCMI_OK for code, _ in first)
    assert len({tuple(words) for _, words in first}) == 8
    assert die_id(node910.lib, 0, NDIE)[0] == DCMI_OK
    # Another process and another node directory of the same shape see the same chips.
    seen = node910.run_python(
        """
        result = []
        for card in range(8):
            die = dcmi.DieId()
            assert lib.dcmi_get_device_die_v2(card, 0, dcmi.VDIE, ctypes.byref(die)) == 0
            result.append(list(die.soc_die))
        """
    )
    assert seen == [words for _, words in first]
    again = make_node(preset="ascend910x8")
    assert [die_id(again.lib, card, VDIE) for card in range(8)] == first


def test_only_the_910_has_an_ndie_id(node910b: SimNode) -> None:
    assert die_id(node910b.lib, 0, NDIE)[0] == NOT_SUPPORT
    assert die_id(node910b.lib, 0, VDIE)[0] == DCMI_OK
    assert die_id(node910b.lib, 0, 7)[0] == INVALID_PARAMETER


def test_version_strings(node910: SimNode) -> None:
    buffer = ctypes.create_string_buffer(64)
    assert node910.lib.dcmi_get_dcmi_version(buffer, 64) == DCMI_OK
    assert buffer.value == b"24.1.0"
    assert node910.lib.dcmi_get_driver_version(buffer, 64) == DCMI_OK
    assert buffer.value == b"24.1.0"
    assert node910.lib.dcmi_get_driver_version(buffer, 3) == INVALID_PARAMETER


def test_presets_may_mix_models(make_node: MakeNode) -> None:
    lib = make_node(preset="910B4x2,ascend910x1,910probX1").lib
    assert dcmi.card_list(lib) == (DCMI_OK, [0, 1, 2, 3])
    names = [chip_info(lib, card).chip_name for card in range(4)]
    assert names == [b"910B4", b"910B4", b"910A", b"910ProB"]
