"""Fixtures for the nvml-sim tests: the library built and preloaded once, and a fresh node.

Everything goes through pynvml exactly as production code does: the library is preloaded by
path with RTLD_GLOBAL, so pynvml's own ``CDLL("libnvidia-ml.so.1")`` resolves to it by SONAME.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pynvml
import pytest

from tests.nvmlsim.simdir import (
    DEFAULT_TOPOLOGY,
    LIBRARY,
    SIM_SOURCE,
    SimDir,
    new_state_dir,
    write_topology,
)


@pytest.fixture(scope="session")
def nvml_library() -> ctypes.CDLL:
    result = subprocess.run(
        ["make", "-C", str(SIM_SOURCE)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"building nvml-sim failed:\n{result.stdout}\n{result.stderr}")
    return ctypes.CDLL(str(LIBRARY), mode=ctypes.RTLD_GLOBAL)


@pytest.fixture
def make_sim(nvml_library: ctypes.CDLL) -> Iterator[Any]:
    """Factory: a fresh NVML_SIM_DIR with `topology`, NVML initialised on it (and shut down and
    removed afterwards, even when the test fails)."""
    made: list[SimDir] = []
    saved = os.environ.get("NVML_SIM_DIR")
    initialised = 0

    def make(topology: str = DEFAULT_TOPOLOGY, init: bool = True) -> SimDir:
        nonlocal initialised
        sim = SimDir(path=new_state_dir(), library=nvml_library)
        made.append(sim)
        write_topology(sim.path, topology)
        os.environ["NVML_SIM_DIR"] = str(sim.path)
        if init:
            pynvml.nvmlInit()
            initialised += 1
        return sim

    try:
        yield make
    finally:
        for _ in range(initialised):
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError_Uninitialized:
                break  # a test that shut down itself
        if saved is None:
            os.environ.pop("NVML_SIM_DIR", None)
        else:
            os.environ["NVML_SIM_DIR"] = saved
        for sim in made:
            shutil.rmtree(sim.path, ignore_errors=True)


@pytest.fixture
def sim(make_sim: Any) -> SimDir:
    """The default node: H100-80GB and A100-40GB in MIG mode, A100-80GB not."""
    node: SimDir = make_sim()
    return node
