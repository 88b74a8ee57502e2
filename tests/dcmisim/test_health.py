"""Health, error codes, temperature, power and lost chips, injected through DIR/health."""

from __future__ import annotations

import ctypes
import os

from tests.dcmisim import dcmi
from tests.dcmisim.conftest import MakeNode
from tests.dcmisim.dcmi import (
    DCMI_OK,
    DEVICE_NOT_EXIST,
    HEALTH_DEVICE_NOT_EXIST,
    INVALID_PARAMETER,
    SimNode,
    error_codes,
    health,
)


def readings(lib: ctypes.CDLL, card: int) -> tuple[int, int]:
    temperature, power = ctypes.c_int(-1), ctypes.c_int(-1)
    assert lib.dcmi_get_device_temperature(card, 0, ctypes.byref(temperature)) == DCMI_OK
    assert lib.dcmi_get_device_power_info(card, 0, ctypes.byref(power)) == DCMI_OK
    return temperature.value, power.value


def test_a_fresh_node_is_healthy(node910b: SimNode) -> None:
    for card in range(8):
        assert health(node910b.lib, card) == (DCMI_OK, 0)
        assert error_codes(node910b.lib, card) == (DCMI_OK, [])
        assert readings(node910b.lib, card) == (46, 739)


def test_health_levels_are_injected_per_chip_and_the_last_line_wins(node910: SimNode) -> None:
    node910.append_health("2 health 1", "2 health 3", "2 health 7", "2 health x", "3 health 2")
    assert health(node910.lib, 2) == (DCMI_OK, 3)
    assert health(node910.lib, 3) == (DCMI_OK, 2)
    assert health(node910.lib, 1) == (DCMI_OK, 0)
    node910.append_health("2 health 0")
    assert health(node910.lib, 2) == (DCMI_OK, 0)
    # Another process reads the same file.
    assert node910.run_python("result = dcmi.health(lib, 3)") == [DCMI_OK, 2]


def test_error_codes_accumulate_in_order_until_cleared(node910b: SimNode) -> None:
    lib = node910b.lib
    node910b.append_health("1 error 0x80E01801", "1 error 2160001024", "1 error 0x80E01801")
    assert error_codes(lib, 1) == (DCMI_OK, [0x80E01801, 2160001024])
    assert error_codes(lib, 0) == (DCMI_OK, [])
    node910b.append_health("1 error clear", "1 error 0x8C084E00", "1 error 0x1FFFFFFFF")
    assert error_codes(lib, 1) == (DCMI_OK, [0x8C084E00])


def test_an_error_list_without_room_for_every_code_is_refused(node910b: SimNode) -> None:
    node910b.append_health("0 error 1", "0 error 2", "0 error 3")
    assert error_codes(node910b.lib, 0, room=2) == (INVALID_PARAMETER, [])
    assert error_codes(node910b.lib, 0, room=0)[0] == INVALID_PARAMETER
    assert error_codes(node910b.lib, 0, room=3) == (DCMI_OK, [1, 2, 3])


def test_at_most_128_error_codes_are_reported(node910b: SimNode) -> None:
    node910b.append_health(*(f"4 error {code}" for code in range(1, 140)))
    code, codes = error_codes(node910b.lib, 4)
    assert (code, codes) == (DCMI_OK, list(range(1, 129)))


def test_error_code_strings(node910b: SimNode) -> None:
    buffer = ctypes.create_string_buffer(256)
    lib = node910b.lib
    assert lib.dcmi_get_device_errorcode_string(0, 0, 0x80E01801, buffer, 256) == DCMI_OK
    assert buffer.value == b"dcmi-sim injected fault 0x80E01801"
    assert lib.dcmi_get_device_errorcode_string(0, 0, 1, buffer, 47) == INVALID_PARAMETER
    assert lib.dcmi_get_device_errorcode_string(0, 0, 1, buffer, 48) == DCMI_OK
    assert buffer.value == b"dcmi-sim injected fault 0x00000001"


def test_temperature_and_power_are_injected(node910: SimNode) -> None:
    node910.append_health("5 temperature_c 93", "5 power_dw 3500", "5 temperature_c -4")
    assert readings(node910.lib, 5) == (93, 3500)
    hbm = dcmi.HbmInfo()
    assert node910.lib.dcmi_get_device_hbm_info(5, 0, ctypes.byref(hbm)) == DCMI_OK
    assert hbm.temp == 93


def test_a_lost_chip_reports_no_device_until_it_comes_back(node910: SimNode) -> None:
    lib = node910.lib
    assert dcmi.create(lib, 6, b"vir08")[0] == DCMI_OK
    node910.append_health("6 lost 1")
    assert health(lib, 6) == (DCMI_OK, HEALTH_DEVICE_NOT_EXIST)
    info = dcmi.ChipInfo()
    assert lib.dcmi_get_device_chip_info(6, 0, ctypes.byref(info)) == DEVICE_NOT_EXIST
    assert dcmi.create(lib, 6, b"vir02")[0] == DEVICE_NOT_EXIST
    assert dcmi.destroy(lib, 6, 196) == DEVICE_NOT_EXIST
    assert dcmi.query(lib, 6, 196)[0] == DEVICE_NOT_EXIST
    assert health(lib, 5) == (DCMI_OK, 0)
    node910.append_health("6 lost 0")
    assert health(lib, 6) == (DCMI_OK, 0)
    assert dcmi.vnpu_ids(lib, 6) == [196]


def test_health_lines_name_the_logic_id_not_the_card_id(make_node: MakeNode) -> None:
    node = make_node("npu 0 910B3 card=7 phy=0\nnpu 1 910B3 card=3 phy=1\n")
    node.append_health("1 health 2")
    assert health(node.lib, 3) == (DCMI_OK, 2)
    assert health(node.lib, 7) == (DCMI_OK, 0)


def test_a_health_fifo_or_directory_is_ignored_without_blocking(make_node: MakeNode) -> None:
    node = make_node(dcmi.topology("910B3", 1))
    os.mkfifo(node.path / "health")
    assert health(node.lib, 0) == (DCMI_OK, 0)
    (node.path / "health").unlink()
    (node.path / "health").mkdir()
    assert error_codes(node.lib, 0) == (DCMI_OK, [])
