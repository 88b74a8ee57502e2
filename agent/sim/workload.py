"""The tenant-workload simulator: ``accelguard sim write|read|hold --partition UUID``.

It reaches a partition the way a tenant's process would: memory through the partition's byte
range of the simulated device memory, and presence through nvml-sim's process table (so NVML
reports it on its instance, as it reports real CUDA processes) plus open file descriptors on the
partition's device nodes.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from agent.config import Config
from agent.errors import HardwareError, NotFoundError, ValidationError
from agent.hw.devnodes import DeviceNode, DeviceNodeMap, own_nodes
from agent.hw.model import GpuInfo, MigInstanceInfo
from agent.hw.nvml import NvmlBackend
from agent.scrub.simmem import MemoryRange, count_occurrences, fill, partition_range

_NVML_ERROR_IN_USE = 19


@dataclass(frozen=True)
class Located:
    gpu: GpuInfo
    instance: MigInstanceInfo | None

    @property
    def placement(self) -> tuple[int, int] | None:
        if self.instance is None:
            return None
        return (self.instance.placement_start, self.instance.placement_size)


def locate(config: Config, partition_uuid: str) -> Located:
    if not config.nvml.sim_dir or not config.sim.memory_dir:
        raise ValidationError(
            "the sim commands need a simulated node's config (accelguard sim init)"
        )
    with NvmlBackend(config.nvml.library, config.nvml.sim_dir) as backend:
        for gpu in backend.inventory():
            if gpu.uuid == partition_uuid and not gpu.mig_current:
                return Located(gpu, None)
            for instance in gpu.instances:
                if instance.uuid == partition_uuid:
                    return Located(gpu, instance)
    raise NotFoundError(f"partition {partition_uuid} does not exist on this simulated node")


def memory_range(config: Config, partition_uuid: str) -> MemoryRange:
    found = locate(config, partition_uuid)
    return partition_range(
        Path(config.sim.memory_dir), found.gpu.uuid, config.sim.slice_bytes, found.placement
    )


def write_pattern(config: Config, partition_uuid: str, pattern: str) -> MemoryRange:
    region = memory_range(config, partition_uuid)
    fill(region, pattern.encode())
    return region


def find_pattern(config: Config, partition_uuid: str, text: str) -> tuple[MemoryRange, int]:
    region = memory_range(config, partition_uuid)
    return region, count_occurrences(region, text.encode())


def _own_nodes(config: Config, found: Located) -> list[DeviceNode]:
    nodes = DeviceNodeMap(config.devices.dev_root, config.devices.proc_root)
    if found.instance is None:
        return own_nodes(nodes.gpu_nodes(found.gpu.minor))
    if found.instance.compute_instance_id is None:
        raise NotFoundError("the MIG instance has no compute instance")
    return own_nodes(
        nodes.mig_nodes(
            found.gpu.minor, found.instance.gpu_instance_id, found.instance.compute_instance_id
        )
    )


def register_process(sim_dir: Path, pid: int, found: Located, used_bytes: int) -> None:
    gi = found.instance.gpu_instance_id if found.instance else -1
    ci = found.instance.compute_instance_id if found.instance else -1
    with (sim_dir / "state.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with (sim_dir / "processes").open("a") as table:
            table.write(f"{pid} {found.gpu.index} {gi} {-1 if ci is None else ci} {used_bytes}\n")
            table.flush()
            os.fsync(table.fileno())


def reset_gpu(config: Config, gpu_index: int) -> None:
    """The simulated GPU reset (``nvidia-smi -r`` on hardware): a pending MIG mode becomes current.

    nvml-sim exports ``nvmlSimResetGpu`` for this; real NVML has no such call, and accelguard never
    resets a GPU by itself: it is the operator's step.
    """
    if not config.nvml.library or not config.nvml.sim_dir:
        raise ValidationError("sim reset-gpu needs a simulated node's config (accelguard sim init)")
    with NvmlBackend(config.nvml.library, config.nvml.sim_dir) as backend:
        count = len(backend.inventory())
        if not 0 <= gpu_index < count:
            raise NotFoundError(f"GPU index {gpu_index} does not exist (this node has {count})")
        library = ctypes.CDLL(config.nvml.library)
        code = library.nvmlSimResetGpu(ctypes.c_uint(gpu_index))
    if code != 0:
        reason = "processes still run on it" if code == _NVML_ERROR_IN_USE else f"NVML error {code}"
        raise HardwareError(f"GPU {gpu_index} was not reset: {reason}")


def hold(config: Config, partition_uuid: str, cgroup: Path | None, ignore_sigterm: bool) -> None:
    """Become a process of the tenant that uses the partition, until killed."""
    if cgroup is not None:
        try:
            (cgroup / "cgroup.procs").write_text(f"{os.getpid()}\n")
        except OSError as error:
            raise ValidationError(f"cannot join cgroup {cgroup}: {error.strerror}") from error
    found = locate(config, partition_uuid)
    # No driver backs the simulated nodes, so a real open() fails with ENXIO; an O_PATH
    # descriptor still names the device (fstat gives its st_rdev), which is what eviction scans.
    descriptors = [os.open(node.path, os.O_PATH) for node in _own_nodes(config, found)]
    register_process(Path(config.nvml.sim_dir), os.getpid(), found, 1 << 20)
    if ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"holding {partition_uuid} as pid {os.getpid()}", flush=True)
    sys.stdout.close()
    try:
        while True:
            signal.pause()
    finally:
        for descriptor in descriptors:
            os.close(descriptor)
