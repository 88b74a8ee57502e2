"""What the rest of accelguard knows about accelerators: plain values, no library types."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.hw.mig.geometry import GpuGeometry, Instance, Placement


@dataclass(frozen=True)
class MigInstanceInfo:
    uuid: str  # "MIG-..." of the compute instance's MIG device; "" while it has no CI
    gpu_instance_id: int
    compute_instance_id: int | None
    profile_id: int
    profile: str
    placement_start: int
    placement_size: int
    memory_bytes: int


@dataclass(frozen=True)
class GpuInfo:
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
    instances: tuple[MigInstanceInfo, ...]

    @property
    def reset_required(self) -> bool:
        return self.mig_current is not None and self.mig_current != self.mig_pending


class AcceleratorBackend(Protocol):
    """The management plane as the layout and inventory services need it. Blocking calls."""

    def open(self) -> None: ...

    def close(self) -> None: ...

    def driver_version(self) -> str: ...

    def inventory(self) -> list[GpuInfo]: ...

    def geometry(self, gpu_index: int) -> GpuGeometry: ...

    def gpu_instances(self, gpu_index: int) -> list[Instance]: ...

    def create_instance(self, gpu_index: int, placement: Placement) -> MigInstanceInfo: ...

    def add_compute_instance(self, gpu_index: int, gpu_instance_id: int) -> MigInstanceInfo: ...

    def destroy_instance(self, gpu_index: int, gpu_instance_id: int) -> None: ...

    def set_mig_mode(self, gpu_index: int, enabled: bool) -> bool: ...

    def running_processes(self, gpu_index: int) -> Sequence[tuple[int, int | None, int | None]]: ...
