"""Which accelerator backends a node runs, from its config: NVML, DCMI, /dev/accel.

The NVIDIA backend is always there for the code that drives MIG (layout, health, NVML's process
lists); on a node without NVIDIA GPUs (``[nvml] enabled = false``) it is ``NoNvidia``, which has
no GPUs and refuses every MIG call with a message that says so. The inventory reads every
enabled backend (``sources``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

from agent.config import Config
from agent.errors import AccelguardError, NotFoundError
from agent.hw.accel import AccelBackend
from agent.hw.ascend.backend import AscendBackend
from agent.hw.mig.geometry import GpuGeometry, Instance, Placement
from agent.hw.model import NVIDIA, DeviceInfo, DeviceSource, InstanceInfo
from agent.hw.nvml import NvmlBackend


class NoNvidia:
    """A node without NVIDIA GPUs: no GPUs, and every MIG call refused."""

    vendor = NVIDIA

    def open(self) -> None:
        return None

    def close(self) -> None:
        return None

    def driver_version(self) -> str:
        return ""

    def gpu_count(self) -> int:
        return 0

    def inventory(self) -> list[DeviceInfo]:
        return []

    def _absent(self) -> NotFoundError:
        return NotFoundError("this node has no NVIDIA GPUs ([nvml] enabled = false)")

    def geometry(self, gpu_index: int) -> GpuGeometry:  # noqa: ARG002 - refused
        raise self._absent()

    def gpu_instances(self, gpu_index: int) -> list[Instance]:  # noqa: ARG002 - refused
        raise self._absent()

    def create_instance(self, gpu_index: int, placement: Placement) -> InstanceInfo:  # noqa: ARG002
        raise self._absent()

    def add_compute_instance(self, gpu_index: int, gpu_instance_id: int) -> InstanceInfo:  # noqa: ARG002
        raise self._absent()

    def destroy_instance(self, gpu_index: int, gpu_instance_id: int) -> None:  # noqa: ARG002
        raise self._absent()

    def set_mig_mode(self, gpu_index: int, enabled: bool) -> bool:  # noqa: ARG002
        raise self._absent()

    def running_processes(self, gpu_index: int) -> list[tuple[int, int | None, int | None]]:  # noqa: ARG002
        return []


@dataclass
class NodeBackends:
    nvml: NvmlBackend | NoNvidia
    ascend: AscendBackend | None
    accel: AccelBackend | None

    @property
    def sources(self) -> Sequence[DeviceSource]:
        result: list[DeviceSource] = []
        if isinstance(self.nvml, NvmlBackend):
            result.append(self.nvml)
        if self.ascend is not None:
            result.append(self.ascend)
        if self.accel is not None:
            result.append(self.accel)
        return result

    def open(self) -> None:
        """Open every backend; one that fails closes those already opened."""
        opened: list[DeviceSource] = []
        try:
            for source in (self.nvml, *self.sources):
                if source not in opened:
                    source.open()
                    opened.append(source)
        except BaseException:
            for source in reversed(opened):
                with contextlib.suppress(AccelguardError):
                    source.close()
            raise

    def close(self) -> None:
        errors: list[AccelguardError] = []
        for source in (self.nvml, *self.sources):
            try:
                source.close()
            except AccelguardError as error:
                errors.append(error)
        if errors:
            raise errors[0]


def node_backends(config: Config) -> NodeBackends:
    nvml: NvmlBackend | NoNvidia = (
        NvmlBackend(library=config.nvml.library, sim_dir=config.nvml.sim_dir)
        if config.nvml.enabled
        else NoNvidia()
    )
    ascend = (
        AscendBackend(library=config.dcmi.library, sim_dir=config.dcmi.sim_dir)
        if config.dcmi.enabled
        else None
    )
    accel = (
        AccelBackend(sys_root=config.accel.sys_root, dev_root=config.devices.dev_root)
        if config.accel.enabled
        else None
    )
    return NodeBackends(nvml=nvml, ascend=ascend, accel=accel)
