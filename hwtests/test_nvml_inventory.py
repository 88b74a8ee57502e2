"""Read-only NVML inventory on a real GPU, compared with nvml-sim's topology for the same model."""

from __future__ import annotations

from typing import Any

import pynvml
import pytest

from agent.errors import HardwareError
from agent.hw.mig.profiles import REFERENCE_GEOMETRIES
from agent.hw.nvml import NvmlBackend

REFERENCE_FOR_NAME = {
    "NVIDIA H100 80GB HBM3": "H100-80GB",
    "NVIDIA A100-SXM4-40GB": "A100-40GB",
    "NVIDIA A100-SXM4-80GB": "A100-80GB",
}


def test_inventory_reads(real_nvml: NvmlBackend, record: dict[str, Any]) -> None:
    gpus = real_nvml.inventory()
    assert gpus, "the driver reports no GPU"
    record["driver_version"] = real_nvml.driver_version()
    record["gpus"] = [
        {
            "index": gpu.index,
            "name": gpu.name,
            "uuid": gpu.uuid,
            "memory_total_bytes": gpu.memory_total_bytes,
            "mig_current": gpu.mig_current,
            "mig_pending": gpu.mig_pending,
            "instances": len(gpu.instances),
            "pci_device_id": hex(gpu.pci_device_id),
        }
        for gpu in gpus
    ]
    for gpu in gpus:
        assert gpu.uuid.startswith("GPU-")
        assert gpu.memory_total_bytes > 0


def test_profile_table_matches_the_simulator(
    real_nvml: NvmlBackend, record: dict[str, Any]
) -> None:
    gpu = real_nvml.inventory()[0]
    model = REFERENCE_FOR_NAME.get(gpu.name)
    try:
        geometry = real_nvml.geometry(0)
    except HardwareError as error:
        pytest.skip(f"NVML does not answer the GPU-instance profile table read-only here: {error}")
    record["geometry"] = {
        "model": geometry.model,
        "profiles": [
            {
                "id": p.profile_id,
                "name": p.name,
                "compute_slices": p.compute_slices,
                "memory_slices": p.memory_slices,
                "starts": list(p.starts),
                "max_instances": p.max_instances,
            }
            for p in geometry.profiles
        ],
    }
    if model is None:
        pytest.skip(f"nvml-sim has no topology for {gpu.name}; recorded its table only")
    reference = {p.profile_id: p for p in REFERENCE_GEOMETRIES[model].profiles}
    for profile in geometry.profiles:
        if profile.profile_id not in reference:
            continue  # newer drivers add profiles (e.g. +gfx); the sim models the classic set
        assert profile == reference[profile.profile_id], profile
    missing = set(reference) - {p.profile_id for p in geometry.profiles}
    assert not missing, f"the real GPU lacks profiles the sim offers: {missing}"


def test_running_processes_read_only(real_nvml: NvmlBackend) -> None:
    for gpu in real_nvml.inventory():
        for pid, _, _ in real_nvml.running_processes(gpu.index):
            assert pid > 0
    assert pynvml.nvmlDeviceGetCount() >= 1
