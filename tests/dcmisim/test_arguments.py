"""Bad arguments, calls before or after a failed dcmi_init, and unusable simulation directories:
every one answers with a documented return code, changes nothing, and never crashes."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections.abc import Callable
from ctypes import byref, c_int, c_uint, c_ulonglong
from typing import Any

import pytest

from tests.dcmisim import dcmi
from tests.dcmisim.conftest import MakeNode
from tests.dcmisim.dcmi import (
    DCMI_OK,
    INNER_ERR,
    INVALID_PARAMETER,
    MAIN_CMD_VDEV_MNG,
    NOT_READY,
    NOT_SUPPORT,
    REPO,
    SimNode,
)

Call = Callable[[ctypes.CDLL], int]


def chip_calls(card: int, device: int) -> dict[str, Call]:
    """Every entry point that names a chip, with valid output buffers."""
    out_int, out_uint = c_int(), c_uint()
    buffer = ctypes.create_string_buffer(256)
    codes = (c_uint * 128)()
    total = dcmi.SocTotalResource()
    size = c_uint(ctypes.sizeof(total))
    request = dcmi.CreateVdevRes(vdev_id=dcmi.VDEV_ID_AUTO, template_name=b"vir02")
    mask = c_ulonglong()
    return {
        "type": lambda lib: lib.dcmi_get_device_type(card, device, byref(out_int)),
        "logic_id": lambda lib: lib.dcmi_get_device_logic_id(byref(out_int), card, device),
        "chip_info": lambda lib: lib.dcmi_get_device_chip_info(
            card, device, byref(dcmi.ChipInfo())
        ),
        "chip_info_v2": lambda lib: lib.dcmi_get_device_chip_info_v2(
            card, device, byref(dcmi.ChipInfoV2())
        ),
        "die": lambda lib: lib.dcmi_get_device_die_v2(card, device, 1, byref(dcmi.DieId())),
        "health": lambda lib: lib.dcmi_get_device_health(card, device, byref(out_uint)),
        "errorcodes": lambda lib: lib.dcmi_get_device_errorcode_v2(
            card, device, byref(out_int), codes, 128
        ),
        "errorstring": lambda lib: lib.dcmi_get_device_errorcode_string(
            card, device, 1, buffer, 256
        ),
        "temperature": lambda lib: lib.dcmi_get_device_temperature(card, device, byref(out_int)),
        "power": lambda lib: lib.dcmi_get_device_power_info(card, device, byref(out_int)),
        "memory": lambda lib: lib.dcmi_get_memory_info(card, device, byref(dcmi.MemoryInfo())),
        "memory_v3": lambda lib: lib.dcmi_get_device_memory_info_v3(
            card, device, byref(dcmi.MemoryInfoV3())
        ),
        "hbm": lambda lib: lib.dcmi_get_device_hbm_info(card, device, byref(dcmi.HbmInfo())),
        "info": lambda lib: lib.dcmi_get_device_info(
            card, device, MAIN_CMD_VDEV_MNG, 1, byref(total), byref(size)
        ),
        "create": lambda lib: lib.dcmi_create_vdevice(
            card, device, byref(request), byref(dcmi.CreateVdevOut())
        ),
        "destroy": lambda lib: lib.dcmi_set_destroy_vdevice(card, device, 100),
        "units": lambda lib: lib.dcmisim_get_vdevice_units(
            card, device, 100, byref(mask), byref(out_uint)
        ),
    }


def out() -> Any:
    """A fresh int output argument."""
    return byref(c_int())


# Every pointer argument NULL in turn (the others valid).
NULL_CALLS: dict[str, Call] = {
    "card_list count": lambda lib: lib.dcmi_get_card_list(None, (c_int * 8)(), 8),
    "card_list list": lambda lib: lib.dcmi_get_card_list(out(), None, 8),
    "card_list len 0": lambda lib: lib.dcmi_get_card_list(out(), (c_int * 8)(), 0),
    "card_list len -1": lambda lib: lib.dcmi_get_card_list(out(), (c_int * 8)(), -1),
    "card_num_list": lambda lib: lib.dcmi_get_card_num_list(None, None, 8),
    "device_num": lambda lib: lib.dcmi_get_device_num_in_card(0, None),
    "id_in_card max": lambda lib: lib.dcmi_get_device_id_in_card(0, None, out(), out()),
    "id_in_card mcu": lambda lib: lib.dcmi_get_device_id_in_card(0, out(), None, out()),
    "id_in_card cpu": lambda lib: lib.dcmi_get_device_id_in_card(0, out(), out(), None),
    "type": lambda lib: lib.dcmi_get_device_type(0, 0, None),
    "logic_id": lambda lib: lib.dcmi_get_device_logic_id(None, 0, 0),
    "phy_from_logic": lambda lib: lib.dcmi_get_device_phyid_from_logicid(0, None),
    "logic_from_phy": lambda lib: lib.dcmi_get_device_logicid_from_phyid(0, None),
    "card_from_logic card": lambda lib: lib.dcmi_get_card_id_device_id_from_logicid(None, out(), 1),
    "card_from_logic dev": lambda lib: lib.dcmi_get_card_id_device_id_from_logicid(out(), None, 1),
    "card_from_phy": lambda lib: lib.dcmi_get_card_id_device_id_from_phyid(None, None, 0),
    "chip_info": lambda lib: lib.dcmi_get_device_chip_info(0, 0, None),
    "chip_info_v2": lambda lib: lib.dcmi_get_device_chip_info_v2(0, 0, None),
    "die": lambda lib: lib.dcmi_get_device_die_v2(0, 0, 1, None),
    "health": lambda lib: lib.dcmi_get_device_health(0, 0, None),
    "errorcodes count": lambda lib: lib.dcmi_get_device_errorcode_v2(0, 0, None, (c_uint * 4)(), 4),
    "errorcodes list": lambda lib: lib.dcmi_get_device_errorcode_v2(0, 0, out(), None, 4),
    "errorstring": lambda lib: lib.dcmi_get_device_errorcode_string(0, 0, 1, None, 256),
    "temperature": lambda lib: lib.dcmi_get_device_temperature(0, 0, None),
    "power": lambda lib: lib.dcmi_get_device_power_info(0, 0, None),
    "memory": lambda lib: lib.dcmi_get_memory_info(0, 0, None),
    "memory_v3": lambda lib: lib.dcmi_get_device_memory_info_v3(0, 0, None),
    "hbm": lambda lib: lib.dcmi_get_device_hbm_info(0, 0, None),
    "info buf": lambda lib: lib.dcmi_get_device_info(0, 0, 52, 1, None, byref(c_uint(4096))),
    "info size": lambda lib: lib.dcmi_get_device_info(0, 0, 52, 1, byref(c_uint()), None),
    "create vdev": lambda lib: lib.dcmi_create_vdevice(0, 0, None, byref(dcmi.CreateVdevOut())),
    "create out": lambda lib: lib.dcmi_create_vdevice(0, 0, byref(dcmi.CreateVdevRes()), None),
    "units mask": lambda lib: lib.dcmisim_get_vdevice_units(0, 0, 100, None, byref(c_uint())),
    "units count": lambda lib: lib.dcmisim_get_vdevice_units(0, 0, 100, byref(c_ulonglong()), None),
    "dcmi_version": lambda lib: lib.dcmi_get_dcmi_version(None, 64),
    "driver_version": lambda lib: lib.dcmi_get_driver_version(None, 64),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(NULL_CALLS))
def test_null_pointers_are_invalid_parameters(node910: SimNode, name: str) -> None:
    before = node910.state()
    assert NULL_CALLS[name](node910.lib) == INVALID_PARAMETER
    assert node910.state() == before


@pytest.mark.parametrize(("card", "device"), [(-1, 0), (8, 0), (1000, 0), (0, 1), (0, -1)])
def test_ids_of_no_chip_are_invalid_parameters(node910: SimNode, card: int, device: int) -> None:
    before = node910.state()
    for name, call in chip_calls(card, device).items():
        assert call(node910.lib) == INVALID_PARAMETER, name
    assert node910.state() == before
    # The chip count names only the card.
    count = c_int(-1)
    expected = DCMI_OK if 0 <= card < 8 else INVALID_PARAMETER
    assert node910.lib.dcmi_get_device_num_in_card(card, byref(count)) == expected


def test_device_info_checks_its_command_and_buffer_size(node910: SimNode) -> None:
    lib = node910.lib
    total = dcmi.SocTotalResource()
    for main_cmd, sub_cmd, size, expected in [
        (MAIN_CMD_VDEV_MNG, 1, ctypes.sizeof(total) - 1, INVALID_PARAMETER),
        (MAIN_CMD_VDEV_MNG, 2, ctypes.sizeof(dcmi.SocFreeResource) - 1, INVALID_PARAMETER),
        (MAIN_CMD_VDEV_MNG, 0, ctypes.sizeof(dcmi.VdevQuery) - 1, INVALID_PARAMETER),
        (MAIN_CMD_VDEV_MNG, 3, 4096, NOT_SUPPORT),
        (MAIN_CMD_VDEV_MNG, 0xFFFFFFFF, 4096, NOT_SUPPORT),
        (0, 0, 4096, NOT_SUPPORT),
        (-1, 1, 4096, NOT_SUPPORT),
    ]:
        room = c_uint(size)
        code = lib.dcmi_get_device_info(0, 0, main_cmd, sub_cmd, byref(total), byref(room))
        assert code == expected, (main_cmd, sub_cmd, size)
    room = c_uint(4096)
    assert lib.dcmi_get_device_info(0, 0, MAIN_CMD_VDEV_MNG, 1, byref(total), byref(room)) == 0
    assert room.value == ctypes.sizeof(total)


BEFORE_INIT = """
import ctypes, json, sys
sys.path.insert(0, {repo!r})
from tests.dcmisim import dcmi
lib = dcmi.load()
count = ctypes.c_int(-1)
most, mcu, cpu = ctypes.c_int(-1), ctypes.c_int(-1), ctypes.c_int(-1)
logic = ctypes.c_int(-1)
print(json.dumps([
    dcmi.card_list(lib)[0],
    lib.dcmi_get_device_num_in_card(0, ctypes.byref(count)), count.value,
    lib.dcmi_get_device_id_in_card(0, ctypes.byref(most), ctypes.byref(mcu), ctypes.byref(cpu)),
    [most.value, mcu.value, cpu.value],
    lib.dcmi_get_device_logic_id(ctypes.byref(logic), 0, 0),
    dcmi.health(lib, 0)[0],
    dcmi.create(lib, 0, b"vir02")[0],
    dcmi.destroy(lib, 0, 100),
]))
"""


def test_calls_before_dcmi_init(node910: SimNode) -> None:
    completed = subprocess.run(
        [sys.executable, "-c", BEFORE_INIT.format(repo=str(REPO))],
        env=node910.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    # The DCMI source: the card list is an internal error, the chip counts are zero, the rest
    # is "not ready".
    assert completed.stdout.strip() == (
        f"[{INNER_ERR}, 0, 0, 0, [0, -1, -1], {NOT_READY}, {NOT_READY}, {NOT_READY}, {NOT_READY}]"
    )
    assert node910.counter() == 0


@pytest.mark.parametrize(
    ("topology", "preset", "message"),
    [
        (None, None, "DCMI_SIM_TOPOLOGY is not set"),
        (None, "ascend910x17", "DCMI_SIM_TOPOLOGY: expected"),
        (None, "h100x2", "DCMI_SIM_TOPOLOGY: expected"),
        (None, "ascend910x", "DCMI_SIM_TOPOLOGY: expected"),
        ("", None, "logic ids must be 0..n-1"),
        ("npu 1 910A\n", None, "logic ids must be 0..n-1"),
        ("npu 0 910A\nnpu 0 910A\n", None, "listed twice"),
        ("npu 0 910C\n", None, "unknown model"),
        ("gpu 0 H100-80GB mig=1\n", None, "expected 'npu"),
        ("npu 0 910A card=64\n", None, "expected card="),
        ("npu 0 910A phy=1 phy=2\n", None, "expected card="),
        ("npu 0 910A card=1\nnpu 1 910A\n", None, "card id 1 is used by two NPUs"),
        ("npu 0 910A phy=1\nnpu 1 910A\n", None, "physical id 1 is used by two NPUs"),
        ("npu 0 910A\0\n", None, "expected 'npu"),
    ],
)
def test_unusable_topologies_fail_dcmi_init(
    make_node: MakeNode,
    capfd: pytest.CaptureFixture[str],
    topology: str | None,
    preset: str | None,
    message: str,
) -> None:
    node = make_node(topology, preset=preset, init=False)
    assert node.init() == INNER_ERR
    err = capfd.readouterr().err
    assert err.startswith("dcmi-sim: ") and message in err, err
    # A failed dcmi_init leaves the library uninitialised.
    assert dcmi.health(node.lib, 0)[0] == NOT_READY
    assert dcmi.create(node.lib, 0, b"vir02")[0] == NOT_READY
    assert not (node.path / "state").exists()


def test_an_unusable_directory_fails_dcmi_init(
    make_node: MakeNode, capfd: pytest.CaptureFixture[str]
) -> None:
    node = make_node(dcmi.topology("910A", 1), init=False)
    for value in ("", str(node.path / "missing"), str(node.path / "topology"), "x" * 5000):
        os.environ["DCMI_SIM_DIR"] = value
        assert node.lib.dcmi_init() == INNER_ERR, value
        assert "dcmi-sim: DCMI_SIM_DIR" in capfd.readouterr().err
    del os.environ["DCMI_SIM_DIR"]
    assert node.lib.dcmi_init() == INNER_ERR
    assert node.init() == DCMI_OK


def test_a_corrupt_state_is_refused_and_never_overwritten(
    node910: SimNode, capfd: pytest.CaptureFixture[str]
) -> None:
    lib = node910.lib
    assert dcmi.create(lib, 0, b"vir08")[0] == DCMI_OK
    corrupt = node910.state().replace("vir08", "vir09").encode()
    node910.replace_state(corrupt)
    assert dcmi.card_list(lib)[0] == INNER_ERR
    assert dcmi.health(lib, 0)[0] == INNER_ERR
    assert dcmi.create(lib, 1, b"vir02")[0] == INNER_ERR
    assert dcmi.destroy(lib, 0, 100) == INNER_ERR
    assert (node910.path / "state").read_bytes() == corrupt
    err = capfd.readouterr().err
    assert err.count("dcmi-sim: ") == 1 and "is corrupt" in err, err  # reported once
    # dcmi_init refuses it too, and leaves it alone.
    assert node910.init() == INNER_ERR
    assert (node910.path / "state").read_bytes() == corrupt


def test_a_missing_state_after_init_is_an_internal_error(node910: SimNode) -> None:
    (node910.path / "state").unlink()
    assert dcmi.card_list(node910.lib)[0] == INNER_ERR
    assert dcmi.create(node910.lib, 0, b"vir02")[0] == INNER_ERR
    assert not (node910.path / "state").exists()
    assert node910.init() == DCMI_OK  # a new init starts from the topology
    assert dcmi.card_list(node910.lib)[0] == DCMI_OK


def test_a_state_that_is_not_a_regular_file_is_an_internal_error(node910: SimNode) -> None:
    state = node910.path / "state"
    state.unlink()
    os.mkfifo(state)
    assert dcmi.card_list(node910.lib)[0] == INNER_ERR
    assert node910.init() == INNER_ERR
    state.unlink()
    state.mkdir()
    assert dcmi.create(node910.lib, 0, b"vir02")[0] == NOT_READY
    assert node910.init() == INNER_ERR
    assert state.is_dir()
