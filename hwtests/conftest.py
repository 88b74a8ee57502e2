"""Tests that need a real NVIDIA GPU and driver. Read-only: they never change MIG mode, create or
destroy instances, reset the GPU or change any setting; they only touch memory they allocate."""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.errors import AccelguardError
from agent.hw.nvml import NvmlBackend


@pytest.fixture(scope="session")
def real_nvml() -> Iterator[NvmlBackend]:
    if not Path("/proc/driver/nvidia/version").exists():
        pytest.skip("no GPU: the NVIDIA driver is not loaded (no /proc/driver/nvidia/version)")
    try:
        loaded = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError as error:
        pytest.skip(f"no GPU: libnvidia-ml.so.1 cannot be loaded ({error})")
    if hasattr(loaded, "nvmlSimResetGpu"):
        pytest.skip("nvml-sim is loaded in this process: run `pytest hwtests` on its own")
    backend = NvmlBackend()
    try:
        backend.open()
    except AccelguardError as error:
        pytest.skip(f"no NVIDIA GPU/driver on this machine: {error}")
    try:
        yield backend
    finally:
        backend.close()


@contextmanager
def recorded(filename: str) -> Iterator[dict[str, Any]]:
    """Findings that are written to $OUT/<filename> at the end, when $OUT is set (device runs)."""
    findings: dict[str, Any] = {}
    yield findings
    out = os.environ.get("OUT")
    if out and findings:
        Path(out, filename).write_text(json.dumps(findings, indent=2, sort_keys=True))


@pytest.fixture(scope="session")
def record() -> Iterator[dict[str, Any]]:
    """What the real hardware reported, written to $OUT/hw-record.json."""
    with recorded("hw-record.json") as findings:
        yield findings
