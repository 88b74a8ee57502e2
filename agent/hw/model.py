"""What the rest of accelguard knows about accelerators: plain values, no library types.

A node's accelerators come from up to three backends (docs/npu.md): NVIDIA GPUs through NVML
(``agent/hw/nvml.py``), Huawei Ascend NPUs through DCMI (``agent/hw/ascend``) and any other
``/dev/accel`` device through sysfs (``agent/hw/accel.py``). Each reports ``DeviceInfo`` values;
``vendor`` says which backend a device belongs to and ``index`` is that backend's own numbering
(NVML index, DCMI logic id, accel minor), so a mixed node has a GPU 0 and an NPU 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.hw.mig.geometry import GpuGeometry, Instance, Placement

# DeviceInfo.vendor
NVIDIA = "nvidia"
HUAWEI = "huawei"
ACCEL = "accel"
VENDORS = (NVIDIA, HUAWEI, ACCEL)


@dataclass(frozen=True)
class InstanceInfo:
    """A partition of a device: a MIG instance (GI + CI) or an Ascend vNPU.

    For a vNPU ``gpu_instance_id`` is its vdev id (what ``/dev/vdavinci<id>`` names),
    ``compute_instance_id`` is None, ``profile`` the vNPU template and ``units`` the memory units
    it owns (``placement_start``/``placement_size`` then describe the lowest unit and the count,
    for display only: a vNPU's units need not be contiguous).
    """

    uuid: str  # "MIG-..." of the compute instance's MIG device; "" while it has no CI
    gpu_instance_id: int
    compute_instance_id: int | None
    profile_id: int
    profile: str
    placement_start: int
    placement_size: int
    memory_bytes: int
    # Memory units the partition owns, for the simulated memory (MIG: its placement's slices).
    units: tuple[int, ...] = ()

    @property
    def memory_units(self) -> tuple[int, ...]:
        if self.units:
            return self.units
        return tuple(range(self.placement_start, self.placement_start + self.placement_size))


@dataclass(frozen=True)
class DeviceInfo:
    """One accelerator: an NVIDIA GPU, an Ascend NPU or a /dev/accel device.

    ``minor`` is the minor of the device's own node (``/dev/nvidiaN``, ``/dev/accel/accelN``) or,
    for an NPU, its physical id (the N of ``/dev/davinciN``). ``mig_current``/``mig_pending`` are
    None for devices without MIG; an NPU is split when it has vNPUs (``instances``), with no mode.
    """

    index: int
    uuid: str
    name: str
    serial: str
    pci_bus_id: str
    pci_device_id: int  # e.g. 0x233010DE (device << 16 | vendor), as mig-parted's device-filter
    minor: int
    memory_total_bytes: int
    mig_current: bool | None  # None: the GPU does not support MIG
    mig_pending: bool | None
    instances: tuple[InstanceInfo, ...]
    vendor: str = NVIDIA
    # The device's memory as the simulated node divides it: MIG memory slices (8 on A100/H100)
    # or, on an NPU, one unit per AI Core (dcmi-sim, docs/dcmi-sim.md "Simulated memory").
    memory_units: int = 8
    driver: str = ""  # /dev/accel devices: the kernel driver bound to it (e.g. "habanalabs")

    @property
    def kind(self) -> str:
        """``gpu``, ``npu`` or ``accel``: what a whole-device partition of it is called."""
        return {HUAWEI: "npu", ACCEL: "accel"}.get(self.vendor, "gpu")

    @property
    def label(self) -> str:
        """How operators name it: ``GPU 0``, ``NPU 3``, ``accel 1``."""
        return {HUAWEI: "NPU", ACCEL: "accel"}.get(self.vendor, "GPU") + f" {self.index}"

    @property
    def reset_required(self) -> bool:
        return self.mig_current is not None and self.mig_current != self.mig_pending


class AcceleratorBackend(Protocol):
    """The management plane as the layout and inventory services need it. Blocking calls."""

    def open(self) -> None: ...

    def close(self) -> None: ...

    def driver_version(self) -> str: ...

    def inventory(self) -> list[DeviceInfo]: ...

    def geometry(self, gpu_index: int) -> GpuGeometry: ...

    def gpu_instances(self, gpu_index: int) -> list[Instance]: ...

    def create_instance(self, gpu_index: int, placement: Placement) -> InstanceInfo: ...

    def add_compute_instance(self, gpu_index: int, gpu_instance_id: int) -> InstanceInfo: ...

    def destroy_instance(self, gpu_index: int, gpu_instance_id: int) -> None: ...

    def set_mig_mode(self, gpu_index: int, enabled: bool) -> bool: ...

    def running_processes(self, gpu_index: int) -> Sequence[tuple[int, int | None, int | None]]: ...


class DeviceSource(Protocol):
    """What the inventory needs of every backend (NVML, DCMI, /dev/accel). Blocking calls."""

    vendor: str

    def open(self) -> None: ...

    def close(self) -> None: ...

    def driver_version(self) -> str: ...

    def inventory(self) -> list[DeviceInfo]: ...
