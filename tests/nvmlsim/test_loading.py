"""Loading through pynvml, the exported symbol surface, and nvmlInit/nvmlShutdown."""

from __future__ import annotations

import ctypes
import inspect
import os
import re
from pathlib import Path
from typing import Any

import pynvml
import pytest

from tests.nvmlsim.simdir import DEFAULT_TOPOLOGY, new_state_dir, write_topology

# The pynvml wrappers accelguard (and the brief for nvml-sim) relies on. Every C symbol they
# look up, directly or through another pynvml wrapper, must exist in the library.
PYNVML_SURFACE = [
    "nvmlInit",
    "nvmlInitWithFlags",
    "nvmlShutdown",
    "nvmlErrorString",
    "nvmlSystemGetDriverVersion",
    "nvmlSystemGetNVMLVersion",
    "nvmlSystemGetCudaDriverVersion",
    "nvmlSystemGetCudaDriverVersion_v2",
    "nvmlDeviceGetCount",
    "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetHandleByUUID",
    "nvmlDeviceGetHandleByUUIDV",
    "nvmlDeviceGetHandleByPciBusId",
    "nvmlDeviceGetHandleBySerial",
    "nvmlDeviceGetName",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetSerial",
    "nvmlDeviceGetIndex",
    "nvmlDeviceGetMinorNumber",
    "nvmlDeviceGetPciInfo",
    "nvmlDeviceGetPciInfo_v3",
    "nvmlDeviceGetPciInfoExt",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetArchitecture",
    "nvmlDeviceGetAttributes",
    "nvmlDeviceGetMigMode",
    "nvmlDeviceSetMigMode",
    "nvmlDeviceGetGpuInstanceProfileInfo",
    "nvmlDeviceGetGpuInstanceProfileInfoV",
    "nvmlDeviceGetGpuInstanceProfileInfoById",
    "nvmlDeviceGetGpuInstancePossiblePlacements",
    "nvmlDeviceGetGpuInstanceRemainingCapacity",
    "nvmlDeviceCreateGpuInstance",
    "nvmlDeviceCreateGpuInstanceWithPlacement",
    "nvmlGpuInstanceDestroy",
    "nvmlDeviceGetGpuInstances",
    "nvmlDeviceGetGpuInstanceById",
    "nvmlGpuInstanceGetInfo",
    "nvmlGpuInstanceGetComputeInstanceProfileInfo",
    "nvmlGpuInstanceGetComputeInstanceProfileInfoV",
    "nvmlGpuInstanceGetComputeInstanceRemainingCapacity",
    "nvmlGpuInstanceGetComputeInstancePossiblePlacements",
    "nvmlGpuInstanceCreateComputeInstance",
    "nvmlGpuInstanceCreateComputeInstanceWithPlacement",
    "nvmlComputeInstanceDestroy",
    "nvmlGpuInstanceGetComputeInstances",
    "nvmlGpuInstanceGetComputeInstanceById",
    "nvmlComputeInstanceGetInfo",
    "nvmlComputeInstanceGetInfo_v2",
    "nvmlDeviceGetMaxMigDeviceCount",
    "nvmlDeviceGetMigDeviceHandleByIndex",
    "nvmlDeviceGetDeviceHandleFromMigDeviceHandle",
    "nvmlDeviceIsMigDeviceHandle",
    "nvmlDeviceGetGpuInstanceId",
    "nvmlDeviceGetComputeInstanceId",
    "nvmlDeviceGetComputeRunningProcesses",
    "nvmlDeviceGetComputeRunningProcesses_v2",
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetGraphicsRunningProcesses",
    "nvmlDeviceGetGraphicsRunningProcesses_v2",
    "nvmlDeviceGetGraphicsRunningProcesses_v3",
    "nvmlDeviceGetMPSComputeRunningProcesses",
    "nvmlEventSetCreate",
    "nvmlDeviceRegisterEvents",
    "nvmlDeviceGetSupportedEventTypes",
    "nvmlEventSetWait",
    "nvmlEventSetWait_v2",
    "nvmlEventSetFree",
    "nvmlDeviceGetTemperature",
    "nvmlDeviceGetTemperatureV",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetTotalEccErrors",
    "nvmlDeviceGetRemappedRows",
    "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetCurrentClocksThrottleReasons",
    "nvmlDeviceGetSupportedClocksEventReasons",
    "nvmlDeviceGetSupportedClocksThrottleReasons",
    "nvmlDeviceGetRetiredPages",
    "nvmlDeviceGetRetiredPages_v2",
    "nvmlDeviceGetRetiredPagesPendingStatus",
]

_LOOKUP = re.compile(r'_nvmlGetFunctionPointer\(\s*"(\w+)"\s*\)')
_CALL = re.compile(r"\b(nvml\w+)\s*\(")


def symbols_resolved_by(wrapper: str, seen: set[str] | None = None) -> set[str]:
    """C symbols a pynvml wrapper looks up, following calls into other pynvml wrappers."""
    seen = set() if seen is None else seen
    if wrapper in seen:
        return set()
    seen.add(wrapper)
    source = inspect.getsource(getattr(pynvml, wrapper))
    symbols = set(_LOOKUP.findall(source))
    for called in _CALL.findall(source):
        if called != wrapper and inspect.isfunction(getattr(pynvml, called, None)):
            symbols |= symbols_resolved_by(called, seen)
    return symbols


def test_every_symbol_pynvml_resolves_for_the_surface_exists(nvml_library: ctypes.CDLL) -> None:
    symbols = set().union(*(symbols_resolved_by(name) for name in PYNVML_SURFACE))
    missing = sorted(symbol for symbol in symbols if not hasattr(nvml_library, symbol))
    assert missing == []
    # Guards the scan itself: it must have found the versioned symbols behind the wrappers.
    assert {"nvmlInitWithFlags", "nvmlDeviceGetCount_v2", "nvmlDeviceGetPciInfo_v3"} <= symbols
    assert len(symbols) >= 70  # 72 with nvidia-ml-py 13.615.71
    assert hasattr(nvml_library, "nvmlSimResetGpu")


def test_pynvml_resolves_the_soname_to_the_preloaded_library(sim: Any) -> None:
    assert pynvml.nvmlLib is not None
    preloaded = ctypes.CDLL(str(sim.library._name), mode=ctypes.RTLD_GLOBAL)
    assert pynvml.nvmlLib._handle == preloaded._handle
    assert pynvml.nvmlSystemGetDriverVersion() == "570.124.06"


def test_soname_is_libnvidia_ml_so_1(nvml_library: ctypes.CDLL) -> None:
    # Loaded again by SONAME alone, the dynamic linker must hand back the preloaded library.
    by_soname = ctypes.CDLL("libnvidia-ml.so.1")
    assert by_soname._handle == nvml_library._handle


@pytest.fixture
def restore_env() -> Any:
    saved = os.environ.get("NVML_SIM_DIR")
    yield
    if saved is None:
        os.environ.pop("NVML_SIM_DIR", None)
    else:
        os.environ["NVML_SIM_DIR"] = saved


def test_calls_before_init_are_uninitialized(nvml_library: ctypes.CDLL) -> None:
    unsigned = ctypes.c_uint()
    assert nvml_library.nvmlDeviceGetCount_v2(ctypes.byref(unsigned)) == 1
    handle = ctypes.c_void_p()
    assert nvml_library.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(handle)) == 1
    assert nvml_library.nvmlShutdown() == 1
    assert nvml_library.nvmlSimResetGpu(0) == 1


def test_init_without_nvml_sim_dir_is_driver_not_loaded(
    nvml_library: ctypes.CDLL, restore_env: None, capfd: pytest.CaptureFixture[str]
) -> None:
    os.environ.pop("NVML_SIM_DIR", None)
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
        pynvml.nvmlInit()
    assert "NVML_SIM_DIR is not set" in capfd.readouterr().err


def test_init_with_missing_dir_is_driver_not_loaded(
    nvml_library: ctypes.CDLL, restore_env: None, capfd: pytest.CaptureFixture[str]
) -> None:
    os.environ["NVML_SIM_DIR"] = "/nonexistent/nvml-sim-dir"
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
        pynvml.nvmlInit()
    err = capfd.readouterr().err
    assert "/nonexistent/nvml-sim-dir" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("topology", "why"),
    [
        ("gpu 0 V100-16GB mig=0\n", "unknown model"),
        ("gpu 0 H100-80GB mig=2\n", "mig=0 or mig=1"),
        ("gpu 1 H100-80GB mig=1\n", "without gaps"),
        ("gpu 0 H100-80GB mig=1\ngpu 0 H100-80GB mig=1\n", "listed twice"),
        ("gpu 8 H100-80GB mig=1\n", "0..7"),
        ("gpus 0 H100-80GB mig=1\n", "expected 'gpu"),
    ],
)
def test_init_with_bad_topology_says_why(
    nvml_library: ctypes.CDLL,
    restore_env: None,
    capfd: pytest.CaptureFixture[str],
    topology: str,
    why: str,
) -> None:
    path = new_state_dir()
    try:
        write_topology(path, topology)
        os.environ["NVML_SIM_DIR"] = str(path)
        with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
            pynvml.nvmlInit()
        assert why in capfd.readouterr().err
        assert not (path / "state").exists()
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def test_missing_topology_is_driver_not_loaded(
    nvml_library: ctypes.CDLL, restore_env: None, capfd: pytest.CaptureFixture[str]
) -> None:
    path = new_state_dir()
    try:
        os.environ["NVML_SIM_DIR"] = str(path)
        with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
            pynvml.nvmlInit()
        assert "topology" in capfd.readouterr().err
    finally:
        path.rmdir()


def test_comments_and_blank_lines_in_topology(make_sim: Any) -> None:
    make_sim("# header\n\n  gpu 0 A100-80GB mig=0   # trailing comment\n\n")
    assert pynvml.nvmlDeviceGetCount() == 1
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    assert pynvml.nvmlDeviceGetName(handle) == "NVIDIA A100-SXM4-80GB"


def test_init_is_reference_counted(sim: Any) -> None:
    pynvml.nvmlInit()
    pynvml.nvmlShutdown()
    assert pynvml.nvmlDeviceGetCount() == 3  # still initialised once
    pynvml.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlShutdown()


def test_shutdown_change_dir_and_init_again(make_sim: Any) -> None:
    first = make_sim("gpu 0 H100-80GB mig=1\n")
    assert pynvml.nvmlDeviceGetCount() == 1
    pynvml.nvmlShutdown()
    make_sim("gpu 0 A100-40GB mig=0\ngpu 1 A100-40GB mig=0\n")
    assert pynvml.nvmlDeviceGetCount() == 2
    assert (first.path / "state").exists()


def test_state_is_created_from_the_topology_on_first_init(sim: Any) -> None:
    state = (sim.path / "state").read_text()
    assert state.startswith("nvml-sim-state 1\n")
    assert "gpu 0 H100-80GB 1 1\n" in state
    assert "gpu 2 A100-80GB 0 0\n" in state
    assert state.endswith("end\n")


def test_a_state_for_other_gpus_is_rebuilt_from_the_topology(
    make_sim: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    node = make_sim("gpu 0 H100-80GB mig=1\n")
    pynvml.nvmlShutdown()
    write_topology(node.path, DEFAULT_TOPOLOGY)
    pynvml.nvmlInit()
    assert pynvml.nvmlDeviceGetCount() == 3
    assert "starting from the topology" in capfd.readouterr().err


def test_corrupt_state_is_refused_at_init(
    make_sim: Any, restore_env: None, capfd: pytest.CaptureFixture[str]
) -> None:
    node = make_sim()
    pynvml.nvmlShutdown()
    Path(node.path / "state").write_text("nvml-sim-state 1\nid zz\n")
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
        pynvml.nvmlInit()
    assert "corrupt" in capfd.readouterr().err
    (node.path / "state").unlink()
    pynvml.nvmlInit()  # the fixture shuts this one down


def test_error_strings(nvml_library: ctypes.CDLL) -> None:
    assert pynvml.nvmlErrorString(pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES) == (
        "Insufficient resources"
    )
    assert str(pynvml.NVMLError(pynvml.NVML_ERROR_IN_USE)) == "In use by another client"


def test_system_versions(sim: Any) -> None:
    assert pynvml.nvmlSystemGetNVMLVersion() == "12.570.124.06"
    assert pynvml.nvmlSystemGetCudaDriverVersion() == 12080
    assert pynvml.nvmlSystemGetCudaDriverVersion_v2() == 12080
