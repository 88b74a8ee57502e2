"""``accelguard sim inject ...`` as an operator runs it (a real subprocess on a node made by
``init_sim_node``), read back through pynvml on the node's NVML directory."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynvml
import pytest

from agent.sim.node import init_sim_node
from tests.nvmlsim.simdir import REPO

XID = pynvml.nvmlEventTypeXidCriticalError


@dataclass(frozen=True)
class Node:
    config: Path
    nvml_dir: Path

    def inject(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent.cli", "--config", str(self.config), "sim", "inject",
             *arguments],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    def ok(self, *arguments: str) -> str:
        result = self.inject(*arguments)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == 1, result.stdout
        return lines[0]


@pytest.fixture
def node(nvml_library: ctypes.CDLL, tmp_path: Path) -> Iterator[Node]:
    made = init_sim_node(tmp_path / "node", "h100x2", slice_bytes=1 << 20)
    nvml_dir = made.root / "nvml"
    saved = os.environ.get("NVML_SIM_DIR")
    os.environ["NVML_SIM_DIR"] = str(nvml_dir)
    pynvml.nvmlInit()
    try:
        yield Node(made.config_path, nvml_dir)
    finally:
        pynvml.nvmlShutdown()
        if saved is None:
            os.environ.pop("NVML_SIM_DIR", None)
        else:
            os.environ["NVML_SIM_DIR"] = saved


@pytest.fixture
def event_set(node: Node) -> Iterator[Any]:
    created = pynvml.nvmlEventSetCreate()
    try:
        for index in range(2):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceRegisterEvents(handle, XID, created)
        yield created
    finally:
        pynvml.nvmlEventSetFree(created)


def gpu(index: int) -> Any:
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def address(handle: Any) -> int | None:
    return ctypes.cast(handle, ctypes.c_void_p).value


def test_xid(node: Node, event_set: Any) -> None:
    assert node.ok("xid", "--gpu", "1", "--gi", "3", "--ci", "0", "--xid", "94") == (
        "injected XID 94 on GPU 1 (GPU instance 3, compute instance 0)"
    )
    assert node.ok("xid", "--gpu", "0", "--xid", "48") == "injected XID 48 on GPU 0"
    first = pynvml.nvmlEventSetWait_v2(event_set, 0)
    second = pynvml.nvmlEventSetWait_v2(event_set, 0)
    assert (address(first.device), first.eventData, first.gpuInstanceId) == (
        address(gpu(1)),
        94,
        3,
    )
    assert first.computeInstanceId == 0
    assert (address(second.device), second.eventData, second.gpuInstanceId) == (
        address(gpu(0)),
        48,
        0xFFFFFFFF,
    )
    with pytest.raises(pynvml.NVMLError_Timeout):
        pynvml.nvmlEventSetWait_v2(event_set, 0)


def test_ecc_remap_and_temperature(node: Node) -> None:
    ecc = pynvml.nvmlDeviceGetTotalEccErrors
    assert node.ok("ecc", "--gpu", "1", "--dbe", "2") == (
        "GPU 1: DBE ECC error count set to 2 (volatile, aggregate)"
    )
    node.ok("ecc", "--gpu", "1", "--sbe", "40")
    assert [ecc(gpu(1), kind, counter) for kind in (0, 1) for counter in (0, 1)] == [40, 40, 2, 2]

    node.ok("remap", "--gpu", "0", "--pending")
    assert pynvml.nvmlDeviceGetRemappedRows(gpu(0))[2:] == (1, 0)
    node.ok("remap", "--gpu", "0", "--pending", "--failure")
    assert pynvml.nvmlDeviceGetRemappedRows(gpu(0))[2:] == (1, 1)
    node.ok("remap", "--gpu", "0", "--clear")
    assert pynvml.nvmlDeviceGetRemappedRows(gpu(0))[2:] == (0, 0)

    assert node.ok("temperature", "--gpu", "0", "91") == "GPU 0: temperature set to 91 C"
    assert pynvml.nvmlDeviceGetTemperature(gpu(0), pynvml.NVML_TEMPERATURE_GPU) == 91


def test_lost_and_back(node: Node, event_set: Any) -> None:
    registered = address(gpu(1))
    assert node.ok("lost", "--gpu", "1") == "GPU 1 fell off the bus (XID 79 injected)"
    data = pynvml.nvmlEventSetWait_v2(event_set, 0)
    assert (address(data.device), data.eventData) == (registered, 79)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        pynvml.nvmlDeviceGetHandleByIndex(1)
    assert pynvml.nvmlDeviceGetCount() == 2
    assert node.ok("lost", "--gpu", "1", "--clear") == "GPU 1 is back on the bus"
    assert pynvml.nvmlDeviceGetIndex(gpu(1)) == 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["xid", "--gpu", "2", "--xid", "48"], "GPU index 2 does not exist (this node has 2)"),
        (["xid", "--gpu", "0", "--xid", "0"], "xid 0 is out of range (1-65535)"),
        (["xid", "--gpu", "0", "--xid", "48", "--gi", "1"], "both a GPU instance"),
        (["ecc", "--gpu", "0", "--sbe", "-1"], "ECC error count -1 is out of range"),
        (["remap", "--gpu", "0"], "needs --pending and/or --failure, or --clear"),
        (["remap", "--gpu", "0", "--clear", "--failure"], "or --clear"),
        (["lost", "--gpu", "-1"], "GPU index -1 does not exist"),
        (["temperature", "--gpu", "0", "500"], "temperature (degrees C) 500 is out of range"),
    ],
)
def test_bad_input_is_refused_in_one_line(node: Node, arguments: list[str], message: str) -> None:
    result = node.inject(*arguments)
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("accelguard: error: ")
    assert message in line
    assert not (node.nvml_dir / "xid").exists()
    assert not (node.nvml_dir / "health").exists()
