"""ctypes bindings of the DCMI subset dcmi-sim implements, and a simulated node's directory.

The structures and prototypes are written from the DCMI API reference (docs/dcmi-sim.md);
``test_abi.py`` checks them field by field against ``native/dcmi-sim/include`` as a C compiler
lays it out, and the prototypes against the header's declarations.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import subprocess
import sys
import textwrap
from ctypes import (
    POINTER,
    c_char,
    c_char_p,
    c_float,
    c_int,
    c_uint,
    c_ulong,
    c_ulonglong,
    c_ushort,
    c_void_p,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tests.support import fast_temp_dir, mutating_calls

REPO = Path(__file__).resolve().parents[2]
SIM_SOURCE = REPO / "native" / "dcmi-sim"
HEADER = SIM_SOURCE / "include" / "dcmi_interface_api.h"
LIBRARY = SIM_SOURCE / "build" / "libdcmi.so"

# Return codes (DCMI API reference, "Return Codes").
DCMI_OK = 0
INVALID_PARAMETER = -8001
INNER_ERR = -8005
INVALID_DEVICE_ID = -8007
DEVICE_NOT_EXIST = -8008
NOT_READY = -8012
NOT_SUPPORT = -8255

VDEV_ID_AUTO = 0xFFFFFFFF
VDEV_ID_ALL = 0xFFFF
HEALTH_DEVICE_NOT_EXIST = 0xFFFFFFFF
MAIN_CMD_VDEV_MNG = 52
SUB_VDEV_RESOURCE, SUB_TOTAL_RESOURCE, SUB_FREE_RESOURCE = 0, 1, 2
NDIE, VDIE = 0, 1


class DcmiStruct(ctypes.Structure):
    c_name: ClassVar[str] = ""


class ChipInfo(DcmiStruct):
    c_name = "dcmi_chip_info"
    _fields_ = (
        ("chip_type", c_char * 32),
        ("chip_name", c_char * 32),
        ("chip_ver", c_char * 32),
        ("aicore_cnt", c_uint),
    )


class ChipInfoV2(DcmiStruct):
    c_name = "dcmi_chip_info_v2"
    _fields_ = (*ChipInfo._fields_, ("npu_name", c_char * 32))


class DieId(DcmiStruct):
    c_name = "dcmi_die_id"
    _fields_ = (("soc_die", c_uint * 5),)


class MemoryInfo(DcmiStruct):
    c_name = "dcmi_memory_info_stru"
    _fields_ = (("memory_size", c_ulonglong), ("freq", c_uint), ("utiliza", c_uint))


class MemoryInfoV3(DcmiStruct):
    c_name = "dcmi_get_memory_info_stru"
    _fields_ = (
        ("memory_size", c_ulonglong),
        ("memory_available", c_ulonglong),
        ("freq", c_uint),
        ("hugepagesize", c_ulong),
        ("hugepages_total", c_ulong),
        ("hugepages_free", c_ulong),
        ("utiliza", c_uint),
        ("reserve", c_char * 60),
    )


class HbmInfo(DcmiStruct):
    c_name = "dcmi_hbm_info"
    _fields_ = (
        ("memory_size", c_ulonglong),
        ("freq", c_uint),
        ("memory_usage", c_ulonglong),
        ("temp", c_int),
        ("bandwith_util_rate", c_uint),
    )


class BaseResource(DcmiStruct):
    c_name = "dcmi_base_resource"
    _fields_ = (
        ("token", c_ulonglong),
        ("token_max", c_ulonglong),
        ("task_timeout", c_ulonglong),
        ("vfg_id", c_uint),
        ("vip_mode", ctypes.c_ubyte),
        ("reserved", ctypes.c_ubyte * 31),
    )


class ComputingResource(DcmiStruct):
    c_name = "dcmi_computing_resource"
    _fields_ = (
        ("aic", c_float),
        ("aiv", c_float),
        ("dsa", c_ushort),
        ("rtsq", c_ushort),
        ("acsq", c_ushort),
        ("cdqm", c_ushort),
        ("c_core", c_ushort),
        ("ffts", c_ushort),
        ("sdma", c_ushort),
        ("pcie_dma", c_ushort),
        ("memory_size", c_ulonglong),
        ("event_id", c_uint),
        ("notify_id", c_uint),
        ("stream_id", c_uint),
        ("model_id", c_uint),
        ("topic_schedule_aicpu", c_ushort),
        ("host_ctrl_cpu", c_ushort),
        ("host_aicpu", c_ushort),
        ("device_aicpu", c_ushort),
        ("topic_ctrl_cpu_slot", c_ushort),
        ("vdev_aicore_utilization", c_uint),
        ("vdev_memory_total", c_ulonglong),
        ("vdev_memory_free", c_ulonglong),
        ("reserved", ctypes.c_ubyte * 12),
    )


class MediaResource(DcmiStruct):
    c_name = "dcmi_media_resource"
    _fields_ = (
        ("jpegd", c_float),
        ("jpege", c_float),
        ("vpc", c_float),
        ("vdec", c_float),
        ("pngd", c_float),
        ("venc", c_float),
        ("reserved", ctypes.c_ubyte * 32),
    )


class CreateVdevRes(DcmiStruct):
    c_name = "dcmi_create_vdev_res_stru"
    _fields_ = (
        ("vdev_id", c_uint),
        ("vfg_id", c_uint),
        ("template_name", c_char * 32),
        ("reserved", ctypes.c_ubyte * 64),
    )


class CreateVdevOut(DcmiStruct):
    c_name = "dcmi_create_vdev_out"
    _fields_ = (
        ("vdev_id", c_uint),
        ("pcie_bus", c_uint),
        ("pcie_device", c_uint),
        ("pcie_func", c_uint),
        ("vfg_id", c_uint),
        ("reserved", ctypes.c_ubyte * 32),
    )


class VdevQueryInfo(DcmiStruct):
    c_name = "dcmi_vdev_query_info"
    _fields_ = (
        ("name", c_char * 16),
        ("status", c_uint),
        ("is_container_used", c_uint),
        ("vfid", c_uint),
        ("vfg_id", c_uint),
        ("container_id", c_ulonglong),
        ("base", BaseResource),
        ("computing", ComputingResource),
        ("media", MediaResource),
    )


class VdevQuery(DcmiStruct):
    c_name = "dcmi_vdev_query_stru"
    _fields_ = (("vdev_id", c_uint), ("query_info", VdevQueryInfo))


class SocFreeResource(DcmiStruct):
    c_name = "dcmi_soc_free_resource"
    _fields_ = (
        ("vfg_num", c_uint),
        ("vfg_bitmap", c_uint),
        ("base", BaseResource),
        ("computing", ComputingResource),
        ("media", MediaResource),
    )


class SocTotalResource(DcmiStruct):
    c_name = "dcmi_soc_total_resource"
    _fields_ = (
        ("vdev_num", c_uint),
        ("vdev_id", c_uint * 32),
        ("vfg_num", c_uint),
        ("vfg_bitmap", c_uint),
        ("base", BaseResource),
        ("computing", ComputingResource),
        ("media", MediaResource),
    )


STRUCTS: tuple[type[DcmiStruct], ...] = (
    ChipInfo,
    ChipInfoV2,
    DieId,
    MemoryInfo,
    MemoryInfoV3,
    HbmInfo,
    BaseResource,
    ComputingResource,
    MediaResource,
    CreateVdevRes,
    CreateVdevOut,
    VdevQueryInfo,
    VdevQuery,
    SocFreeResource,
    SocTotalResource,
)

P_INT, P_UINT = POINTER(c_int), POINTER(c_uint)

# name -> argument types; every function returns int. Enums are passed as int.
PROTOTYPES: dict[str, list[Any]] = {
    "dcmi_init": [],
    "dcmi_get_dcmi_version": [c_char_p, c_uint],
    "dcmi_get_driver_version": [c_char_p, c_uint],
    "dcmi_get_card_list": [P_INT, P_INT, c_int],
    "dcmi_get_card_num_list": [P_INT, P_INT, c_int],
    "dcmi_get_device_num_in_card": [c_int, P_INT],
    "dcmi_get_device_id_in_card": [c_int, P_INT, P_INT, P_INT],
    "dcmi_get_device_type": [c_int, c_int, P_INT],
    "dcmi_get_device_logic_id": [P_INT, c_int, c_int],
    "dcmi_get_device_phyid_from_logicid": [c_uint, P_UINT],
    "dcmi_get_device_logicid_from_phyid": [c_uint, P_UINT],
    "dcmi_get_card_id_device_id_from_logicid": [P_INT, P_INT, c_uint],
    "dcmi_get_card_id_device_id_from_phyid": [P_INT, P_INT, c_uint],
    "dcmi_get_device_chip_info": [c_int, c_int, POINTER(ChipInfo)],
    "dcmi_get_device_chip_info_v2": [c_int, c_int, POINTER(ChipInfoV2)],
    "dcmi_get_device_die_v2": [c_int, c_int, c_int, POINTER(DieId)],
    "dcmi_get_device_health": [c_int, c_int, P_UINT],
    "dcmi_get_device_errorcode_v2": [c_int, c_int, P_INT, P_UINT, c_uint],
    "dcmi_get_device_errorcode_string": [c_int, c_int, c_uint, c_char_p, c_int],
    "dcmi_get_device_temperature": [c_int, c_int, P_INT],
    "dcmi_get_device_power_info": [c_int, c_int, P_INT],
    "dcmi_get_memory_info": [c_int, c_int, POINTER(MemoryInfo)],
    "dcmi_get_device_memory_info_v3": [c_int, c_int, POINTER(MemoryInfoV3)],
    "dcmi_get_device_hbm_info": [c_int, c_int, POINTER(HbmInfo)],
    "dcmi_get_device_info": [c_int, c_int, c_int, c_uint, c_void_p, P_UINT],
    "dcmi_create_vdevice": [c_int, c_int, POINTER(CreateVdevRes), POINTER(CreateVdevOut)],
    "dcmi_set_destroy_vdevice": [c_int, c_int, c_uint],
    "dcmisim_get_vdevice_units": [c_int, c_int, c_uint, POINTER(c_ulonglong), P_UINT],
}


def build_library() -> str:
    """Run make; returns its output when it fails, else an empty string."""
    result = subprocess.run(
        ["make", "-s", "-C", str(SIM_SOURCE)], capture_output=True, text=True, check=False
    )
    return "" if result.returncode == 0 else f"{result.stdout}\n{result.stderr}"


def load(path: Path = LIBRARY) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    for name, argtypes in PROTOTYPES.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = c_int
    return library


# ---- calls, with the output decoded --------------------------------------------------------


def card_list(lib: ctypes.CDLL) -> tuple[int, list[int]]:
    count = c_int(-1)
    cards = (c_int * 64)()
    code = lib.dcmi_get_card_list(ctypes.byref(count), cards, 64)
    return code, list(cards[: max(count.value, 0)])


def create(
    lib: ctypes.CDLL, card: int, template: bytes, vdev_id: int = VDEV_ID_AUTO
) -> tuple[int, int]:
    request = CreateVdevRes(vdev_id=vdev_id, vfg_id=VDEV_ID_AUTO, template_name=template)
    out = CreateVdevOut()
    code = lib.dcmi_create_vdevice(card, 0, ctypes.byref(request), ctypes.byref(out))
    return code, out.vdev_id


def destroy(lib: ctypes.CDLL, card: int, vdev_id: int) -> int:
    return int(lib.dcmi_set_destroy_vdevice(card, 0, vdev_id))


def total_resource(lib: ctypes.CDLL, card: int) -> SocTotalResource:
    total = SocTotalResource()
    size = c_uint(ctypes.sizeof(total))
    code = lib.dcmi_get_device_info(
        card, 0, MAIN_CMD_VDEV_MNG, SUB_TOTAL_RESOURCE, ctypes.byref(total), ctypes.byref(size)
    )
    assert code == DCMI_OK, code
    return total


def free_resource(lib: ctypes.CDLL, card: int) -> SocFreeResource:
    free = SocFreeResource()
    size = c_uint(ctypes.sizeof(free))
    code = lib.dcmi_get_device_info(
        card, 0, MAIN_CMD_VDEV_MNG, SUB_FREE_RESOURCE, ctypes.byref(free), ctypes.byref(size)
    )
    assert code == DCMI_OK, code
    return free


def vnpu_ids(lib: ctypes.CDLL, card: int) -> list[int]:
    total = total_resource(lib, card)
    return list(total.vdev_id[: total.vdev_num])


def query(lib: ctypes.CDLL, card: int, vdev_id: int) -> tuple[int, VdevQuery]:
    request = VdevQuery(vdev_id=vdev_id)
    size = c_uint(ctypes.sizeof(request))
    code = lib.dcmi_get_device_info(
        card, 0, MAIN_CMD_VDEV_MNG, SUB_VDEV_RESOURCE, ctypes.byref(request), ctypes.byref(size)
    )
    return code, request


def units(lib: ctypes.CDLL, card: int, vdev_id: int) -> tuple[int, int, int]:
    mask = c_ulonglong(0)
    count = c_uint(0)
    code = lib.dcmisim_get_vdevice_units(card, 0, vdev_id, ctypes.byref(mask), ctypes.byref(count))
    return code, mask.value, count.value


def health(lib: ctypes.CDLL, card: int) -> tuple[int, int]:
    value = c_uint(12345)
    code = lib.dcmi_get_device_health(card, 0, ctypes.byref(value))
    return code, value.value


def error_codes(lib: ctypes.CDLL, card: int, room: int = 128) -> tuple[int, list[int]]:
    count = c_int(-1)
    codes = (c_uint * max(room, 1))()
    code = lib.dcmi_get_device_errorcode_v2(card, 0, ctypes.byref(count), codes, room)
    return code, list(codes[: max(count.value, 0)])


# ---- a simulated node's directory ----------------------------------------------------------


def topology(model: str, count: int = 8) -> str:
    """DIR/topology text for `count` NPUs of one model, default card and physical ids."""
    return "".join(f"npu {index} {model}\n" for index in range(count))


# On tmpfs when there is one: every mutating call renames two files.
def new_sim_dir() -> Path:
    return fast_temp_dir("dcmisim-")


@dataclass
class SimNode:
    """One simulated node's DCMI_SIM_DIR and the control files tests write."""

    path: Path
    lib: ctypes.CDLL

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DCMI_SIM_DIR": str(self.path)}

    def init(self) -> int:
        os.environ["DCMI_SIM_DIR"] = str(self.path)
        return int(self.lib.dcmi_init())

    def counter(self) -> int:
        return mutating_calls(self.path)

    def append_health(self, *lines: str) -> None:
        with (self.path / "health").open("a") as handle:
            handle.write("".join(line + "\n" for line in lines))

    def state(self) -> str:
        return (self.path / "state").read_text()

    def replace_state(self, data: bytes) -> None:
        """Write DIR/state as another tool must: under the flock on DIR/state.lock."""
        with (self.path / "state.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            (self.path / "state").write_bytes(data)

    def run_python(self, code: str, timeout: float = 60) -> Any:
        """Run `code` in a fresh interpreter with the library loaded and initialised on this
        node; the script sets ``result``, which comes back as JSON."""
        script = PRELUDE.format(repo=str(REPO)) + textwrap.dedent(code) + EPILOGUE
        completed = subprocess.run(
            [sys.executable, "-c", script],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert completed.returncode == 0, completed.stderr
        return json.loads(completed.stdout.strip().splitlines()[-1])


PRELUDE = """\
import ctypes, json, sys
sys.path.insert(0, {repo!r})
from tests.dcmisim import dcmi
lib = dcmi.load()
assert lib.dcmi_init() == 0
result = None
"""
EPILOGUE = """
print(json.dumps(result))
"""
