"""ctypes bindings of the DCMI subset accelguard uses, and DCMI return codes -> accelguard errors.

Written from the DCMI API reference (one page per function, "Return Codes"), the same source as
dcmi-sim's ``native/dcmi-sim/include/dcmi_interface_api.h`` (docs/dcmi-sim.md). Invariants:

* every function is called through ``DcmiLibrary``, which sets ``argtypes`` and ``restype`` from
  ``PROTOTYPES`` before the first call, so ctypes converts and checks every argument;
  ``tests/npu/test_dcmi_signatures.py`` compares ``PROTOTYPES`` with the header's declarations
  and ``tests/dcmisim/test_abi.py`` the structures with the C compiler's layout of the header;
* output buffers are ctypes objects this process owns (``create_string_buffer``, structures),
  never Python ``bytes``;
* nothing above ``agent/hw/ascend`` sees a DCMI code: ``dcmi_error`` turns one into an
  accelguard error whose message names the function, the chip and the code.
"""

from __future__ import annotations

import ctypes
from ctypes import (
    POINTER,
    c_char,
    c_char_p,
    c_float,
    c_int,
    c_ubyte,
    c_uint,
    c_ulong,
    c_ulonglong,
    c_ushort,
    c_void_p,
)
from typing import Any, ClassVar

from agent.errors import GpuLostError, HardwareError, InsufficientResourcesError, InUseError

# ---- return codes (DCMI API reference, "Return Codes") ---------------------------------------

DCMI_OK = 0
INVALID_PARAMETER = -8001
OPER_NOT_PERMITTED = -8002
MEM_OPERATE_FAIL = -8003
SECURE_FUN_FAIL = -8004
INNER_ERR = -8005
TIME_OUT = -8006
INVALID_DEVICE_ID = -8007
DEVICE_NOT_EXIST = -8008
IOCTL_FAIL = -8009
SEND_MSG_FAIL = -8010
RECV_MSG_FAIL = -8011
NOT_READY = -8012  # DCMI_ERR_CODE_NOT_REDAY: the reference's spelling
NOT_SUPPORT_IN_CONTAINER = -8013
RESET_FAIL = -8015
ABORT_OPERATE = -8016
IS_UPGRADING = -8017
RESOURCE_OCCUPIED = -8020
CONFIG_INFO_NOT_EXIST = -8023
NOT_SUPPORT = -8255

CODE_NAMES: dict[int, str] = {
    DCMI_OK: "DCMI_OK",
    INVALID_PARAMETER: "DCMI_ERR_CODE_INVALID_PARAMETER",
    OPER_NOT_PERMITTED: "DCMI_ERR_CODE_OPER_NOT_PERMITTED",
    MEM_OPERATE_FAIL: "DCMI_ERR_CODE_MEM_OPERATE_FAIL",
    SECURE_FUN_FAIL: "DCMI_ERR_CODE_SECURE_FUN_FAIL",
    INNER_ERR: "DCMI_ERR_CODE_INNER_ERR",
    TIME_OUT: "DCMI_ERR_CODE_TIME_OUT",
    INVALID_DEVICE_ID: "DCMI_ERR_CODE_INVALID_DEVICE_ID",
    DEVICE_NOT_EXIST: "DCMI_ERR_CODE_DEVICE_NOT_EXIST",
    IOCTL_FAIL: "DCMI_ERR_CODE_IOCTL_FAIL",
    SEND_MSG_FAIL: "DCMI_ERR_CODE_SEND_MSG_FAIL",
    RECV_MSG_FAIL: "DCMI_ERR_CODE_RECV_MSG_FAIL",
    NOT_READY: "DCMI_ERR_CODE_NOT_REDAY",
    NOT_SUPPORT_IN_CONTAINER: "DCMI_ERR_CODE_NOT_SUPPORT_IN_CONTAINER",
    RESET_FAIL: "DCMI_ERR_CODE_RESET_FAIL",
    ABORT_OPERATE: "DCMI_ERR_CODE_ABORT_OPERATE",
    IS_UPGRADING: "DCMI_ERR_CODE_IS_UPGRADING",
    RESOURCE_OCCUPIED: "DCMI_ERR_CODE_RESOURCE_OCCUPIED",
    CONFIG_INFO_NOT_EXIST: "DCMI_ERR_CODE_CONFIG_INFO_NOT_EXIST",
    NOT_SUPPORT: "DCMI_ERR_CODE_NOT_SUPPORT",
}

# ---- values the reference gives names --------------------------------------------------------

CHIP_NAME_LEN = 32  # MAX_CHIP_NAME_LEN
TEMPLATE_NAME_LEN = 32
DIE_ID_WORDS = 5  # DIE_ID_COUNT
VDEV_RES_NAME_LEN = 16
SOC_SPLIT_MAX = 32  # entries of dcmi_soc_total_resource.vdev_id
VDEV_ID_AUTO = 0xFFFFFFFF  # create: "allocated automatically"
VDEV_ID_ALL = 0xFFFF  # destroy: every vNPU of the chip (driver behaviour); never sent by us
HEALTH_DEVICE_NOT_EXIST = 0xFFFFFFFF  # dcmi_get_device_health: "the device does not exist"
ERROR_CODE_MAX_COUNT = 128  # dcmi_get_device_errorcode_v2 returns at most this many
MIN_ERROR_INFO_LEN = 48  # dcmi_get_device_errorcode_string needs at least this buffer
NPU_TYPE = 0  # enum dcmi_unit_type
NDIE, VDIE = 0, 1  # enum dcmi_die_type
MAIN_CMD_VDEV_MNG = 52  # enum dcmi_main_cmd: DCMI_MAIN_CMD_VDEV_MNG
# Sub-commands of DCMI_MAIN_CMD_VDEV_MNG (DCMI_VMNG_SUB_CMD_*).
SUB_VDEV_RESOURCE, SUB_TOTAL_RESOURCE, SUB_FREE_RESOURCE = 0, 1, 2

# ---- structures -------------------------------------------------------------------------------


class DcmiStruct(ctypes.Structure):
    """A DCMI structure; ``c_name`` is its ``struct`` tag in the header."""

    c_name: ClassVar[str] = ""


class ChipInfo(DcmiStruct):
    c_name = "dcmi_chip_info"
    _fields_ = (
        ("chip_type", c_char * CHIP_NAME_LEN),
        ("chip_name", c_char * CHIP_NAME_LEN),
        ("chip_ver", c_char * CHIP_NAME_LEN),
        ("aicore_cnt", c_uint),
    )


class ChipInfoV2(DcmiStruct):
    c_name = "dcmi_chip_info_v2"
    _fields_ = (*ChipInfo._fields_, ("npu_name", c_char * CHIP_NAME_LEN))


class DieId(DcmiStruct):
    c_name = "dcmi_die_id"
    _fields_ = (("soc_die", c_uint * DIE_ID_WORDS),)


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
        ("vip_mode", c_ubyte),
        ("reserved", c_ubyte * 31),
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
        ("reserved", c_ubyte * 12),
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
        ("reserved", c_ubyte * 32),
    )


class CreateVdevRes(DcmiStruct):
    c_name = "dcmi_create_vdev_res_stru"
    _fields_ = (
        ("vdev_id", c_uint),
        ("vfg_id", c_uint),
        ("template_name", c_char * TEMPLATE_NAME_LEN),
        ("reserved", c_ubyte * 64),
    )


class CreateVdevOut(DcmiStruct):
    c_name = "dcmi_create_vdev_out"
    _fields_ = (
        ("vdev_id", c_uint),
        ("pcie_bus", c_uint),
        ("pcie_device", c_uint),
        ("pcie_func", c_uint),
        ("vfg_id", c_uint),
        ("reserved", c_ubyte * 32),
    )


class VdevQueryInfo(DcmiStruct):
    c_name = "dcmi_vdev_query_info"
    _fields_ = (
        ("name", c_char * VDEV_RES_NAME_LEN),
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
        ("vdev_id", c_uint * SOC_SPLIT_MAX),
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

# ---- prototypes -------------------------------------------------------------------------------

P_INT, P_UINT = POINTER(c_int), POINTER(c_uint)

# (name, restype, argtypes). An enum parameter is passed as int: C11 6.7.2.2 makes an enum
# compatible with an integer type, 4 bytes with GCC on LP64, and every value here fits an int.
# `char *` and `unsigned char *` are byte buffers the caller owns (c_char_p accepts a
# create_string_buffer).
PROTOTYPES: tuple[tuple[str, Any, tuple[Any, ...]], ...] = (
    ("dcmi_init", c_int, ()),
    ("dcmi_get_dcmi_version", c_int, (c_char_p, c_uint)),
    ("dcmi_get_driver_version", c_int, (c_char_p, c_uint)),
    ("dcmi_get_card_list", c_int, (P_INT, P_INT, c_int)),
    ("dcmi_get_card_num_list", c_int, (P_INT, P_INT, c_int)),
    ("dcmi_get_device_num_in_card", c_int, (c_int, P_INT)),
    ("dcmi_get_device_id_in_card", c_int, (c_int, P_INT, P_INT, P_INT)),
    ("dcmi_get_device_type", c_int, (c_int, c_int, P_INT)),
    ("dcmi_get_device_logic_id", c_int, (P_INT, c_int, c_int)),
    ("dcmi_get_device_phyid_from_logicid", c_int, (c_uint, P_UINT)),
    ("dcmi_get_device_logicid_from_phyid", c_int, (c_uint, P_UINT)),
    ("dcmi_get_card_id_device_id_from_logicid", c_int, (P_INT, P_INT, c_uint)),
    ("dcmi_get_card_id_device_id_from_phyid", c_int, (P_INT, P_INT, c_uint)),
    ("dcmi_get_device_chip_info", c_int, (c_int, c_int, POINTER(ChipInfo))),
    ("dcmi_get_device_chip_info_v2", c_int, (c_int, c_int, POINTER(ChipInfoV2))),
    ("dcmi_get_device_die_v2", c_int, (c_int, c_int, c_int, POINTER(DieId))),
    ("dcmi_get_device_health", c_int, (c_int, c_int, P_UINT)),
    ("dcmi_get_device_errorcode_v2", c_int, (c_int, c_int, P_INT, P_UINT, c_uint)),
    ("dcmi_get_device_errorcode_string", c_int, (c_int, c_int, c_uint, c_char_p, c_int)),
    ("dcmi_get_device_temperature", c_int, (c_int, c_int, P_INT)),
    ("dcmi_get_device_power_info", c_int, (c_int, c_int, P_INT)),
    ("dcmi_get_memory_info", c_int, (c_int, c_int, POINTER(MemoryInfo))),
    ("dcmi_get_device_memory_info_v3", c_int, (c_int, c_int, POINTER(MemoryInfoV3))),
    ("dcmi_get_device_hbm_info", c_int, (c_int, c_int, POINTER(HbmInfo))),
    ("dcmi_get_device_info", c_int, (c_int, c_int, c_int, c_uint, c_void_p, P_UINT)),
    (
        "dcmi_create_vdevice",
        c_int,
        (c_int, c_int, POINTER(CreateVdevRes), POINTER(CreateVdevOut)),
    ),
    ("dcmi_set_destroy_vdevice", c_int, (c_int, c_int, c_uint)),
    # dcmi-sim only: the simulated memory units a vNPU owns (docs/dcmi-sim.md).
    ("dcmisim_get_vdevice_units", c_int, (c_int, c_int, c_uint, POINTER(c_ulonglong), P_UINT)),
)

# Symbols of the simulator that Huawei's library does not have: their absence is normal.
SIM_EXTENSIONS = frozenset({"dcmisim_get_vdevice_units"})

# Where the Ascend driver package installs the library when the loader path does not name it.
SYSTEM_LIBRARIES = (
    "libdcmi.so",
    "/usr/local/dcmi/libdcmi.so",
    "/usr/local/Ascend/driver/lib64/driver/libdcmi.so",
)


def code_text(code: int) -> str:
    """``-8001 (DCMI_ERR_CODE_INVALID_PARAMETER)``."""
    return f"{code} ({CODE_NAMES.get(code, 'an unknown DCMI code')})"


class DcmiLibrary:
    """libdcmi.so loaded with every function of ``PROTOTYPES`` that it exports bound.

    ``path`` "" means the driver's library: ``libdcmi.so`` from the loader path, else the
    driver package's install locations. A function the library lacks fails when called, naming
    it, so an older driver still serves what it has.
    """

    def __init__(self, path: str = "") -> None:
        self.path, handle = _load(path)
        self._functions: dict[str, Any] = {}
        for name, restype, argtypes in PROTOTYPES:
            try:
                function = getattr(handle, name)
            except AttributeError:
                continue
            function.restype = restype
            function.argtypes = argtypes
            self._functions[name] = function

    def has(self, name: str) -> bool:
        return name in self._functions

    def function(self, name: str) -> Any:
        """The bound ctypes function (its ``argtypes``/``restype`` set from ``PROTOTYPES``)."""
        function = self._functions.get(name)
        if function is None:
            raise HardwareError(
                f"{self.path} does not export {name}: the Ascend driver is older than the DCMI "
                "API accelguard uses"
            )
        return function

    def call(self, name: str, *arguments: Any) -> int:
        """Call one DCMI function; returns its return code."""
        return int(self.function(name)(*arguments))


def _load(path: str) -> tuple[str, ctypes.CDLL]:
    candidates = (path,) if path else SYSTEM_LIBRARIES
    failures = []
    for candidate in candidates:
        try:
            return candidate, ctypes.CDLL(candidate)
        except OSError as error:
            failures.append(str(error))
    if path:
        raise HardwareError(f"cannot load DCMI library {path}: {failures[0]}")
    raise HardwareError(
        "cannot load the Ascend driver's libdcmi.so (tried "
        + ", ".join(SYSTEM_LIBRARIES)
        + "): is the Ascend driver installed, or dcmi.library set?"
    )


def dcmi_error(function: str, code: int, where: str, *, names_vnpu: bool = False) -> HardwareError:
    """The accelguard error for DCMI return code ``code`` of ``function`` about ``where`` (the
    chip, e.g. ``NPU 0 (card 0, device 0)``). ``names_vnpu``: the call named a vNPU, so
    DEVICE_NOT_EXIST may mean that vNPU rather than the chip (the caller tells them apart).

    -8001 is DCMI's answer both to a bad argument and to a vNPU create that does not fit (the
    driver's -EINVAL, docs/dcmi-sim.md "Capacity"); the backend checks arguments, templates and
    free capacity itself before it creates, so a create's -8001 is a chip without room, and a
    destroy's -8001 after the backend found the vNPU on that chip is the driver's refusal of a
    vNPU still bound to a container.
    """
    message = f"{where}: {function} failed with {code_text(code)}"
    if function == "dcmi_create_vdevice" and code == INVALID_PARAMETER:
        return InsufficientResourcesError(
            f"{message}: the chip has no room for the vNPU (capacity was checked just before, so "
            "something else changed the chip's vNPUs); re-read the layout"
        )
    if function == "dcmi_set_destroy_vdevice" and code == INVALID_PARAMETER:
        return InUseError(
            f"{message}: the driver refuses to destroy a vNPU bound to a container; stop it first"
        )
    if code == DEVICE_NOT_EXIST and names_vnpu:
        return HardwareError(f"{message}: the vNPU does not exist (any more); re-read the chip")
    if code == DEVICE_NOT_EXIST:
        return GpuLostError(f"{message}: the NPU does not answer (lost)")
    if code == NOT_READY:
        return HardwareError(f"{message}: DCMI is not initialised")
    if function == "dcmi_init":
        return HardwareError(
            f"{message}: is the Ascend driver loaded (or dcmi.sim_dir a dcmi-sim directory)?"
        )
    return HardwareError(message)


def check(code: int, function: str, where: str, *, names_vnpu: bool = False) -> None:
    """Raise ``dcmi_error`` unless ``code`` is DCMI_OK."""
    if code != DCMI_OK:
        raise dcmi_error(function, code, where, names_vnpu=names_vnpu)
