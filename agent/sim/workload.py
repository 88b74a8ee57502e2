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
from agent.hw.model import NVIDIA, DeviceInfo, InstanceInfo
from agent.hw.nvml import NvmlBackend
from agent.hw.sources import node_backends
from agent.partitions.inventory import partition_nodes, partitions_of
from agent.scrub.simmem import MemoryRegion, count_occurrences, fill, partition_region
from agent.store import PartitionRecord

_NVML_ERROR_IN_USE = 19


@dataclass(frozen=True)
class Located:
    gpu: DeviceInfo
    instance: InstanceInfo | None
    partition: PartitionRecord
    nodes: tuple[DeviceNode, ...]

    @property
    def units(self) -> tuple[int, ...] | None:
        """The memory units the partition owns; None for a whole device."""
        if self.instance is None:
            return None
        return self.instance.memory_units


def locate(config: Config, partition_uuid: str) -> Located:
    """The partition on the simulated node, through the same backends the agent reads."""
    if not config.sim.memory_dir or not (config.nvml.sim_dir or config.dcmi.sim_dir):
        raise ValidationError(
            "the sim commands need a simulated node's config (accelguard sim init)"
        )
    backends = node_backends(config)
    backends.open()
    try:
        devices = tuple(d for source in backends.sources for d in source.inventory())
        partitions = {p.uuid: p for p in partitions_of(devices)}
        if partition_uuid not in partitions:
            raise NotFoundError(f"partition {partition_uuid} does not exist on this simulated node")
        partition = partitions[partition_uuid]
        device = next(d for d in devices if d.uuid == partition.gpu_uuid)
        instance = next((i for i in device.instances if i.uuid == partition_uuid), None)
        device_map = DeviceNodeMap(config.devices.dev_root, config.devices.proc_root)
        nodes = partition_nodes(device_map, backends.accel, device, partition)
    finally:
        backends.close()
    return Located(device, instance, partition, tuple(nodes))


def memory_region(config: Config, partition_uuid: str) -> MemoryRegion:
    found = locate(config, partition_uuid)
    return partition_region(
        Path(config.sim.memory_dir), found.gpu.uuid, config.sim.slice_bytes, found.units,
        found.gpu.memory_units,
    )  # fmt: skip


def write_pattern(config: Config, partition_uuid: str, pattern: str) -> MemoryRegion:
    region = memory_region(config, partition_uuid)
    fill(region, pattern.encode())
    return region


def find_pattern(config: Config, partition_uuid: str, text: str) -> tuple[MemoryRegion, int]:
    region = memory_region(config, partition_uuid)
    return region, count_occurrences(region, text.encode())


def _own_nodes(found: Located) -> list[DeviceNode]:
    if found.partition.kind == "mig" and found.partition.ci_id is None:
        raise NotFoundError("the MIG instance has no compute instance")
    return own_nodes(list(found.nodes))


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
    descriptors = [os.open(node.path, os.O_PATH) for node in _own_nodes(found)]
    if found.gpu.vendor == NVIDIA:
        # nvml-sim's process table: NVML reports the process on its GPU or instance. DCMI and
        # /dev/accel have no process list; their holders are found by their open nodes only.
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
