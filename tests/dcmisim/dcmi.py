"""The DCMI bindings loaded on dcmi-sim for tests, calls with their output decoded, and a
simulated node's directory.

The structures, prototypes and codes are the production ones (``agent/hw/ascend/dcmi.py``);
``test_abi.py`` checks the structures field by field against ``native/dcmi-sim/include`` as a C
compiler lays it out, and the prototypes against the header's declarations.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import subprocess
import sys
import textwrap
from ctypes import c_int, c_uint, c_ulonglong
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.hw.ascend.dcmi import (
    DCMI_OK,
    DEVICE_NOT_EXIST,
    HEALTH_DEVICE_NOT_EXIST,
    INNER_ERR,
    INVALID_DEVICE_ID,
    INVALID_PARAMETER,
    MAIN_CMD_VDEV_MNG,
    NDIE,
    NOT_READY,
    NOT_SUPPORT,
    PROTOTYPES,
    STRUCTS,
    SUB_FREE_RESOURCE,
    SUB_TOTAL_RESOURCE,
    SUB_VDEV_RESOURCE,
    VDEV_ID_ALL,
    VDEV_ID_AUTO,
    VDIE,
    BaseResource,
    ChipInfo,
    ChipInfoV2,
    ComputingResource,
    CreateVdevOut,
    CreateVdevRes,
    DcmiStruct,
    DieId,
    HbmInfo,
    MediaResource,
    MemoryInfo,
    MemoryInfoV3,
    SocFreeResource,
    SocTotalResource,
    VdevQuery,
    VdevQueryInfo,
)
from tests.support import fast_temp_dir, mutating_calls

# The production names the suite takes from here (test modules import them from this module).
__all__ = [
    "DCMI_OK",
    "DEVICE_NOT_EXIST",
    "HEALTH_DEVICE_NOT_EXIST",
    "INNER_ERR",
    "INVALID_DEVICE_ID",
    "INVALID_PARAMETER",
    "MAIN_CMD_VDEV_MNG",
    "NDIE",
    "NOT_READY",
    "NOT_SUPPORT",
    "PROTOTYPES",
    "STRUCTS",
    "SUB_FREE_RESOURCE",
    "SUB_TOTAL_RESOURCE",
    "SUB_VDEV_RESOURCE",
    "VDEV_ID_ALL",
    "VDEV_ID_AUTO",
    "VDIE",
    "BaseResource",
    "ChipInfo",
    "ChipInfoV2",
    "ComputingResource",
    "CreateVdevOut",
    "CreateVdevRes",
    "DcmiStruct",
    "DieId",
    "HbmInfo",
    "MediaResource",
    "MemoryInfo",
    "MemoryInfoV3",
    "SocFreeResource",
    "SocTotalResource",
    "VdevQuery",
    "VdevQueryInfo",
]

REPO = Path(__file__).resolve().parents[2]
SIM_SOURCE = REPO / "native" / "dcmi-sim"
HEADER = SIM_SOURCE / "include" / "dcmi_interface_api.h"
LIBRARY = SIM_SOURCE / "build" / "libdcmi.so"


def build_library() -> str:
    """Run make; returns its output when it fails, else an empty string."""
    result = subprocess.run(
        ["make", "-s", "-C", str(SIM_SOURCE)], capture_output=True, text=True, check=False
    )
    return "" if result.returncode == 0 else f"{result.stdout}\n{result.stderr}"


def load(path: Path = LIBRARY) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    for name, restype, argtypes in PROTOTYPES:
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = restype
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
