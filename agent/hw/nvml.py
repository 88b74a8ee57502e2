"""NVIDIA backend through pynvml (nvidia-ml-py).

The same code drives a real driver and nvml-sim: on a simulated node the config names the sim's
``libnvidia-ml.so.1``, which we load by path with ``RTLD_GLOBAL`` before ``nvmlInit``; pynvml's own
``CDLL("libnvidia-ml.so.1")`` then resolves to it by SONAME. Every ``pynvml.NVMLError`` is
translated here; nothing above ``hw/`` sees a pynvml type.

A partition on a MIG GPU is a GPU instance with one compute instance spanning all of it (what
``nvidia-smi mig -cgi ... -C`` and mig-parted create).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pynvml

from agent.errors import (
    GpuLostError,
    HardwareError,
    InsufficientResourcesError,
    InUseError,
    NotFoundError,
)
from agent.hw.mig.geometry import GiProfile, GpuGeometry, Instance, Placement
from agent.hw.model import NVIDIA, DeviceInfo, InstanceInfo
from agent.runtime import failpoints
from agent.runtime.failpoints import CrashPoint

# nvml.h: NVML_VALUE_NOT_AVAILABLE (0xFFFFFFFF) in gpuInstanceId/computeInstanceId of a process
# that does not run in a MIG instance.
_NOT_AVAILABLE = 0xFFFFFFFF
_MAX_INSTANCES = 32


@contextmanager
def nvml_errors(what: str) -> Iterator[None]:
    """Translate pynvml errors raised inside the block into accelguard errors."""
    try:
        yield
    except pynvml.NVMLError as error:
        code = getattr(error, "value", None)
        message = f"{what}: {error} (NVML error {code})"
        if code == pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES:
            raise InsufficientResourcesError(message) from error
        if code == pynvml.NVML_ERROR_IN_USE:
            raise InUseError(message) from error
        if code == pynvml.NVML_ERROR_GPU_IS_LOST:
            raise GpuLostError(message) from error
        # NVML_ERROR_NOT_FOUND stays a HardwareError: what the agent asks NVML for is what it
        # found or made itself (a handle, a GPU instance it created), so its absence is a device
        # fault, not rejected input. Names an operator gives (a GPU index, a profile) are checked
        # before NVML is called, and only those are NotFoundError (exit 4).
        if code in (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED):
            raise HardwareError(
                f"{message}: is the NVIDIA driver loaded (or nvml.library set for a simulated "
                "node)?"
            ) from error
        raise HardwareError(message) from error


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlBackend:
    """Blocking NVML calls; the daemon runs them on its executor thread."""

    vendor = NVIDIA

    def __init__(self, library: str = "", sim_dir: str = "") -> None:
        self._library = library
        self._sim_dir = sim_dir
        self._open = False
        # A GPU's MIG profile table is fixed by its model; cache it per GPU UUID.
        self._geometries: dict[str, GpuGeometry] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self) -> None:
        if self._open:
            return
        if self._sim_dir:
            # nvml-sim reads its state directory at every nvmlInit.
            os.environ["NVML_SIM_DIR"] = self._sim_dir
        if self._library:
            try:
                ctypes.CDLL(self._library, mode=ctypes.RTLD_GLOBAL)
            except OSError as error:
                raise HardwareError(f"cannot load NVML library {self._library}: {error}") from error
        with nvml_errors("nvmlInit"):
            pynvml.nvmlInit()
        self._open = True

    def close(self) -> None:
        if self._open:
            with nvml_errors("nvmlShutdown"):
                pynvml.nvmlShutdown()
            self._open = False

    def __enter__(self) -> NvmlBackend:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries --------------------------------------------------------------------------------

    def driver_version(self) -> str:
        with nvml_errors("reading the driver version"):
            return _text(pynvml.nvmlSystemGetDriverVersion())

    def gpu_count(self) -> int:
        with nvml_errors("counting GPUs"):
            return int(pynvml.nvmlDeviceGetCount())

    def _handle(self, gpu_index: int) -> Any:
        count = self.gpu_count()
        if not 0 <= gpu_index < count:
            raise NotFoundError(f"GPU index {gpu_index} does not exist (this node has {count})")
        with nvml_errors(f"GPU {gpu_index}: getting its handle"):
            return pynvml.nvmlDeviceGetHandleByIndex(gpu_index)

    def inventory(self) -> list[DeviceInfo]:
        """Every GPU that answers. One that fell off the bus (NVML_ERROR_GPU_IS_LOST) is left
        out, so the rest of the node stays managed: its partitions are then absent, which the
        reconciler treats as hardware gone (leases lost, fences revoked), and the health monitor
        quarantines them. Any other error fails the whole read (unknown means unsafe)."""
        gpus = []
        for index in range(self.gpu_count()):
            with contextlib.suppress(GpuLostError):
                gpus.append(self.gpu(index))
        return gpus

    def gpu(self, gpu_index: int) -> DeviceInfo:
        handle = self._handle(gpu_index)
        where = f"GPU {gpu_index}"
        with nvml_errors(f"{where}: reading identity"):
            uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
            name = _text(pynvml.nvmlDeviceGetName(handle))
            pci = pynvml.nvmlDeviceGetPciInfo(handle)
            minor = int(pynvml.nvmlDeviceGetMinorNumber(handle))
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        try:
            serial = _text(pynvml.nvmlDeviceGetSerial(handle))
        except pynvml.NVMLError:
            serial = ""  # consumer boards have no serial; not an error
        current, pending = self._mig_mode(handle, where)
        instances = tuple(self._instances(gpu_index, handle)) if current else ()
        return DeviceInfo(
            index=gpu_index,
            uuid=uuid,
            name=name,
            serial=serial,
            pci_bus_id=_text(pci.busId),
            pci_device_id=int(pci.pciDeviceId),
            minor=minor,
            memory_total_bytes=int(memory.total),
            mig_current=current,
            mig_pending=pending,
            instances=instances,
        )

    def _mig_mode(self, handle: Any, where: str) -> tuple[bool | None, bool | None]:
        try:
            current, pending = pynvml.nvmlDeviceGetMigMode(handle)
        except pynvml.NVMLError as error:
            if getattr(error, "value", None) == pynvml.NVML_ERROR_NOT_SUPPORTED:
                return None, None
            with nvml_errors(f"{where}: reading MIG mode"):
                raise
        return bool(current), bool(pending)

    def geometry(self, gpu_index: int) -> GpuGeometry:
        handle = self._handle(gpu_index)
        with nvml_errors(f"GPU {gpu_index}: reading its UUID"):
            uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
        if uuid not in self._geometries:
            self._geometries[uuid] = self._read_geometry(gpu_index, handle)
        return self._geometries[uuid]

    def _read_geometry(self, gpu_index: int, handle: Any) -> GpuGeometry:
        profiles: list[GiProfile] = []
        for index in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
            try:
                info = pynvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, index)
            except pynvml.NVMLError as error:
                if getattr(error, "value", None) in (
                    pynvml.NVML_ERROR_NOT_SUPPORTED,
                    pynvml.NVML_ERROR_INVALID_ARGUMENT,
                ):
                    continue
                with nvml_errors(f"GPU {gpu_index}: reading GPU-instance profile {index}"):
                    raise
            if info.instanceCount == 0:
                continue
            placements = (pynvml.c_nvmlGpuInstancePlacement_t * _MAX_INSTANCES)()
            count = ctypes.c_uint(_MAX_INSTANCES)
            with nvml_errors(f"GPU {gpu_index}: reading placements of profile {info.id}"):
                pynvml.nvmlDeviceGetGpuInstancePossiblePlacements(
                    handle, info.id, placements, ctypes.byref(count)
                )
            found = [placements[i] for i in range(count.value)]
            if not found:
                continue
            name = _text(info.name).removeprefix("MIG ").strip()
            profiles.append(
                GiProfile(
                    profile_id=int(info.id),
                    name=name,
                    compute_slices=int(info.sliceCount),
                    memory_slices=int(found[0].size),
                    starts=tuple(sorted(int(p.start) for p in found)),
                    max_instances=int(info.instanceCount),
                )
            )
        if not profiles:
            raise HardwareError(f"GPU {gpu_index} reports no MIG GPU-instance profiles")
        with nvml_errors(f"GPU {gpu_index}: reading its name"):
            model = _text(pynvml.nvmlDeviceGetName(handle))
        return GpuGeometry(
            model=model,
            compute_slices=max(p.compute_slices for p in profiles),
            memory_slices=max(start + p.memory_slices for p in profiles for start in p.starts),
            profiles=tuple(profiles),
        )

    def _gpu_instance_handles(self, gpu_index: int, handle: Any) -> list[tuple[Any, Any]]:
        """(GI handle, GI info) for every GPU instance, over every profile."""
        result: list[tuple[Any, Any]] = []
        for profile in self.geometry(gpu_index).profiles:
            array = (pynvml.c_nvmlGpuInstance_t * _MAX_INSTANCES)()
            count = ctypes.c_uint(0)
            with nvml_errors(f"GPU {gpu_index}: listing instances of profile {profile.name}"):
                pynvml.nvmlDeviceGetGpuInstances(
                    handle, profile.profile_id, array, ctypes.byref(count)
                )
                for i in range(count.value):
                    result.append((array[i], pynvml.nvmlGpuInstanceGetInfo(array[i])))
        return sorted(result, key=lambda item: int(item[1].id))

    def _compute_profiles(self, gi_handle: Any, where: str) -> Iterator[Any]:
        """The compute-instance profiles this GPU instance supports (NVML profile info structs)."""
        for index in range(pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT):
            try:
                yield pynvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(
                    gi_handle, index, pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED
                )
            except pynvml.NVMLError as error:
                if getattr(error, "value", None) in (
                    pynvml.NVML_ERROR_NOT_SUPPORTED,
                    pynvml.NVML_ERROR_INVALID_ARGUMENT,
                ):
                    continue
                with nvml_errors(f"{where}: reading compute-instance profiles"):
                    raise

    def _compute_instances(self, gi_handle: Any, where: str) -> list[Any]:
        found: list[Any] = []
        for info in self._compute_profiles(gi_handle, where):
            array = (pynvml.c_nvmlComputeInstance_t * _MAX_INSTANCES)()
            count = ctypes.c_uint(0)
            with nvml_errors(f"{where}: listing compute instances"):
                pynvml.nvmlGpuInstanceGetComputeInstances(
                    gi_handle, info.id, array, ctypes.byref(count)
                )
                found.extend(
                    pynvml.nvmlComputeInstanceGetInfo(array[i]) for i in range(count.value)
                )
        return found

    def _mig_devices(self, gpu_index: int, handle: Any) -> dict[tuple[int, int], tuple[str, int]]:
        """(GI id, CI id) -> (MIG UUID, memory bytes), from the MIG device handles."""
        devices: dict[tuple[int, int], tuple[str, int]] = {}
        with nvml_errors(f"GPU {gpu_index}: counting MIG devices"):
            maximum = int(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle))
        for index in range(maximum):
            try:
                mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, index)
            except pynvml.NVMLError as error:
                if getattr(error, "value", None) == pynvml.NVML_ERROR_NOT_FOUND:
                    continue
                with nvml_errors(f"GPU {gpu_index}: MIG device {index}"):
                    raise
            with nvml_errors(f"GPU {gpu_index}: reading MIG device {index}"):
                key = (
                    int(pynvml.nvmlDeviceGetGpuInstanceId(mig)),
                    int(pynvml.nvmlDeviceGetComputeInstanceId(mig)),
                )
                devices[key] = (
                    _text(pynvml.nvmlDeviceGetUUID(mig)),
                    int(pynvml.nvmlDeviceGetMemoryInfo(mig).total),
                )
        return devices

    def _instances(self, gpu_index: int, handle: Any) -> Iterator[InstanceInfo]:
        names = {p.profile_id: p.name for p in self.geometry(gpu_index).profiles}
        mig_devices = self._mig_devices(gpu_index, handle)
        for gi_handle, gi in self._gpu_instance_handles(gpu_index, handle):
            where = f"GPU {gpu_index} GI {gi.id}"
            cis = self._compute_instances(gi_handle, where)
            profile_id = int(gi.profileId)
            for ci in cis or [None]:
                ci_id: int | None = None
                uuid, memory = "", 0
                if ci is not None:
                    ci_id = int(ci.id)
                    uuid, memory = mig_devices.get((int(gi.id), ci_id), ("", 0))
                yield InstanceInfo(
                    uuid=uuid,
                    gpu_instance_id=int(gi.id),
                    compute_instance_id=ci_id,
                    profile_id=profile_id,
                    profile=names.get(profile_id, str(profile_id)),
                    placement_start=int(gi.placement.start),
                    placement_size=int(gi.placement.size),
                    memory_bytes=memory,
                )

    def gpu_instances(self, gpu_index: int) -> list[Instance]:
        handle = self._handle(gpu_index)
        return [
            Instance(
                gi_id=int(gi.id),
                profile_id=int(gi.profileId),
                start=int(gi.placement.start),
                size=int(gi.placement.size),
            )
            for _, gi in self._gpu_instance_handles(gpu_index, handle)
        ]

    def running_processes(self, gpu_index: int) -> list[tuple[int, int | None, int | None]]:
        """(pid, GI id, CI id) of every compute process NVML reports on the GPU."""
        handle = self._handle(gpu_index)
        with nvml_errors(f"GPU {gpu_index}: listing running processes"):
            processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        result: list[tuple[int, int | None, int | None]] = []
        for process in processes:
            gi = int(getattr(process, "gpuInstanceId", _NOT_AVAILABLE))
            ci = int(getattr(process, "computeInstanceId", _NOT_AVAILABLE))
            result.append(
                (
                    int(process.pid),
                    None if gi == _NOT_AVAILABLE else gi,
                    None if ci == _NOT_AVAILABLE else ci,
                )
            )
        return result

    # -- mutations ------------------------------------------------------------------------------

    def set_mig_mode(self, gpu_index: int, enabled: bool) -> bool:
        """Request a MIG mode. Returns True when a GPU reset is needed to make it current."""
        handle = self._handle(gpu_index)
        current, pending = self._mig_mode(handle, f"GPU {gpu_index}")
        if current is None:
            raise HardwareError(f"GPU {gpu_index} does not support MIG")
        if pending == enabled:
            return current != enabled
        with nvml_errors(f"GPU {gpu_index}: setting MIG mode {'on' if enabled else 'off'}"):
            status = pynvml.nvmlDeviceSetMigMode(
                handle, pynvml.NVML_DEVICE_MIG_ENABLE if enabled else pynvml.NVML_DEVICE_MIG_DISABLE
            )
        return bool(status != pynvml.NVML_SUCCESS)

    def create_instance(self, gpu_index: int, placement: Placement) -> InstanceInfo:
        """Create a GPU instance at an exact placement, then its full compute instance."""
        handle = self._handle(gpu_index)
        where = f"GPU {gpu_index}: creating profile {placement.profile_id} at {placement.start}"
        nvml_placement = pynvml.c_nvmlGpuInstancePlacement_t()
        nvml_placement.start = placement.start
        nvml_placement.size = placement.size
        with nvml_errors(where):
            gi_handle = pynvml.nvmlDeviceCreateGpuInstanceWithPlacement(
                handle, placement.profile_id, ctypes.byref(nvml_placement)
            )
            gi = pynvml.nvmlGpuInstanceGetInfo(gi_handle)
        failpoints.hit(CrashPoint.LAYOUT_BETWEEN_GI_AND_CI)
        return self.add_compute_instance(gpu_index, int(gi.id))

    def add_compute_instance(self, gpu_index: int, gpu_instance_id: int) -> InstanceInfo:
        """Give a GPU instance the compute instance that spans all of its slices."""
        handle = self._handle(gpu_index)
        where = f"GPU {gpu_index} GI {gpu_instance_id}"
        with nvml_errors(f"{where}: looking it up"):
            gi_handle = pynvml.nvmlDeviceGetGpuInstanceById(handle, gpu_instance_id)
            gi = pynvml.nvmlGpuInstanceGetInfo(gi_handle)
        geometry = self.geometry(gpu_index)
        slices = next(
            (p.compute_slices for p in geometry.profiles if p.profile_id == int(gi.profileId)),
            None,
        )
        if slices is None:
            raise HardwareError(f"{where}: unknown GPU-instance profile {gi.profileId}")
        if not self._compute_instances(gi_handle, where):
            profile_id = self._full_compute_profile(gi_handle, slices, where)
            with nvml_errors(f"{where}: creating its compute instance"):
                pynvml.nvmlGpuInstanceCreateComputeInstance(gi_handle, profile_id)
        for instance in self._instances(gpu_index, handle):
            if instance.gpu_instance_id == gpu_instance_id:
                return instance
        raise HardwareError(f"{where}: created but not listed by NVML")

    def _full_compute_profile(self, gi_handle: Any, slices: int, where: str) -> int:
        for info in self._compute_profiles(gi_handle, where):
            if int(info.sliceCount) == slices:
                return int(info.id)
        raise HardwareError(f"{where}: no compute-instance profile spans {slices} slices")

    def destroy_instance(self, gpu_index: int, gpu_instance_id: int) -> None:
        """Destroy a GPU instance and its compute instances (NVML refuses while in use)."""
        handle = self._handle(gpu_index)
        where = f"GPU {gpu_index} GI {gpu_instance_id}"
        with nvml_errors(f"{where}: looking it up"):
            gi_handle = pynvml.nvmlDeviceGetGpuInstanceById(handle, gpu_instance_id)
        for ci in self._compute_instances(gi_handle, where):
            with nvml_errors(f"{where}: destroying compute instance {ci.id}"):
                pynvml.nvmlComputeInstanceDestroy(
                    pynvml.nvmlGpuInstanceGetComputeInstanceById(gi_handle, ci.id)
                )
        with nvml_errors(f"{where}: destroying it"):
            pynvml.nvmlGpuInstanceDestroy(gi_handle)
