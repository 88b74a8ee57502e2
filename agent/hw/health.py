"""What NVML says about a GPU's health, read-only: counters and state (:func:`read_gpu_health`)
and XID events (:class:`XidWatcher`), the same code on hardware and on nvml-sim.

A reading never raises for one field NVML does not support on this GPU (``NOT_SUPPORTED``: the
field is None); a GPU that fell off the bus (``NVML_ERROR_GPU_IS_LOST``) is a reading with
``lost`` set, and any other error is a reading with ``error`` set: the monitor decides what
either means. Blocking calls: run them on a thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import time
from dataclasses import dataclass
from typing import Any, Final

import pynvml

from agent.errors import HardwareError
from agent.hw.nvml import nvml_errors

# nvml.h: gpuInstanceId / computeInstanceId are 0xFFFFFFFF when the event is not MIG-specific.
_NO_INSTANCE: Final = 0xFFFFFFFF


@dataclass(frozen=True)
class GpuHealthReading:
    index: int
    uuid: str
    at: float
    lost: bool = False
    error: str = ""
    temperature_c: int | None = None
    power_w: float | None = None
    ecc_volatile_sbe: int | None = None
    ecc_volatile_dbe: int | None = None
    ecc_aggregate_sbe: int | None = None
    ecc_aggregate_dbe: int | None = None
    remapped_correctable: int | None = None
    remapped_uncorrectable: int | None = None
    remap_pending: bool | None = None
    remap_failure: bool | None = None
    clocks_event_reasons: int | None = None
    # Dynamic page retirement (before Ampere; A100/H100 remap rows instead: None there).
    retired_pages_sbe: int | None = None
    retired_pages_dbe: int | None = None
    retired_pages_pending: bool | None = None
    # Replay, recovery and CRC errors summed over the GPU's active NVLinks (None: no NVLink).
    nvlink_errors: int | None = None

    @property
    def readable(self) -> bool:
        return not self.lost and not self.error


@dataclass(frozen=True)
class XidEvent:
    gpu_index: int
    xid: int
    gi_id: int | None  # the GPU instance NVML attributes it to (MIG), None when not
    ci_id: int | None
    at: float


_UNSUPPORTED: Final = frozenset(
    {pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND}
)
_NVLINK_COUNTERS: Final = (
    pynvml.NVML_NVLINK_ERROR_DL_REPLAY,
    pynvml.NVML_NVLINK_ERROR_DL_RECOVERY,
    pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT,
    pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA,
)


def _optional(call: Any, *args: Any) -> Any:
    """The call's value, None where this GPU (or this NVML) does not have the feature."""
    try:
        return call(*args)
    except pynvml.NVMLError as error:
        if getattr(error, "value", None) in _UNSUPPORTED:
            return None
        raise


def _nvlink_errors(handle: Any) -> int | None:
    total, links = 0, 0
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        try:
            state = pynvml.nvmlDeviceGetNvLinkState(handle, link)
        except pynvml.NVMLError as error:
            code = getattr(error, "value", None)
            if code in _UNSUPPORTED or code == pynvml.NVML_ERROR_INVALID_ARGUMENT:
                break  # no NVLink, or past the GPU's last link
            raise
        if state != pynvml.NVML_FEATURE_ENABLED:
            continue
        links += 1
        for counter in _NVLINK_COUNTERS:
            total += int(
                _optional(pynvml.nvmlDeviceGetNvLinkErrorCounter, handle, link, counter) or 0
            )
    return total if links else None


def read_gpu_health(gpu_index: int, uuid: str = "") -> GpuHealthReading:
    """One GPU's health now (NVML must be initialised: ``NvmlBackend.open``)."""
    now = time.time()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(gpu_index)
        if not uuid:
            raw = pynvml.nvmlDeviceGetUUID(handle)
            uuid = raw.decode() if isinstance(raw, bytes) else str(raw)
        temperature = _optional(
            pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU
        )
        power = _optional(pynvml.nvmlDeviceGetPowerUsage, handle)
        ecc = {
            (kind, counter): _optional(pynvml.nvmlDeviceGetTotalEccErrors, handle, kind, counter)
            for kind in (
                pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
                pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            )
            for counter in (pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC)
        }
        remap = _optional(pynvml.nvmlDeviceGetRemappedRows, handle)
        reasons = _optional(pynvml.nvmlDeviceGetCurrentClocksEventReasons, handle)
        retired = {
            cause: _optional(pynvml.nvmlDeviceGetRetiredPages, handle, cause)
            for cause in (
                pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
                pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR,
            )
        }
        retired_pending = _optional(pynvml.nvmlDeviceGetRetiredPagesPendingStatus, handle)
        nvlink = _nvlink_errors(handle)
    except pynvml.NVMLError as error:
        code = getattr(error, "value", None)
        if code == pynvml.NVML_ERROR_GPU_IS_LOST:
            return GpuHealthReading(gpu_index, uuid, now, lost=True, error=str(error))
        return GpuHealthReading(gpu_index, uuid, now, error=f"{error} (NVML error {code})")
    corrected, uncorrected = (
        pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
        pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
    )
    volatile, aggregate = pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC
    return GpuHealthReading(
        index=gpu_index,
        uuid=uuid,
        at=now,
        temperature_c=None if temperature is None else int(temperature),
        power_w=None if power is None else int(power) / 1000.0,
        ecc_volatile_sbe=_int(ecc[(corrected, volatile)]),
        ecc_volatile_dbe=_int(ecc[(uncorrected, volatile)]),
        ecc_aggregate_sbe=_int(ecc[(corrected, aggregate)]),
        ecc_aggregate_dbe=_int(ecc[(uncorrected, aggregate)]),
        remapped_correctable=None if remap is None else int(remap[0]),
        remapped_uncorrectable=None if remap is None else int(remap[1]),
        remap_pending=None if remap is None else bool(remap[2]),
        remap_failure=None if remap is None else bool(remap[3]),
        clocks_event_reasons=_int(reasons),
        retired_pages_sbe=_count(
            retired[pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS]
        ),
        retired_pages_dbe=_count(retired[pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR]),
        retired_pages_pending=None if retired_pending is None else bool(retired_pending),
        nvlink_errors=nvlink,
    )


def _address(handle: Any) -> int:
    return int(ctypes.cast(handle, ctypes.c_void_p).value or 0)


def _count(pages: Any) -> int | None:
    return None if pages is None else len(pages)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


class XidWatcher:
    """One NVML event set with every GPU registered for critical XID errors.

    Register it before the agent accepts grants: an event set receives only what happens after
    the registration. ``wait`` blocks up to ``timeout_ms`` (run it on its own thread: the
    daemon's executor must not wait on it).
    """

    def __init__(self) -> None:
        self._set: Any = None
        # A handle's address -> GPU index: nvmlDeviceGetIndex fails on a GPU that is lost,
        # exactly when its XID 79 arrives.
        self._index_of: dict[int, int] = {}
        self.registered: list[int] = []
        self.unregistered: dict[int, str] = {}
        self._gpu_count = 0

    def open(self, gpu_count: int) -> None:
        self._gpu_count = gpu_count
        with nvml_errors("creating the XID event set"):
            self._set = pynvml.nvmlEventSetCreate()
        self.registered, self.unregistered, self._index_of = [], {}, {}
        for index in range(gpu_count):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                pynvml.nvmlDeviceRegisterEvents(
                    handle, pynvml.nvmlEventTypeXidCriticalError, self._set
                )
            except pynvml.NVMLError as error:
                # A GPU that cannot deliver XIDs (lost, or not supported) is watched by polling.
                self.unregistered[index] = str(error)
                continue
            self._index_of[_address(handle)] = index
            self.registered.append(index)

    def wait(self, timeout_ms: int) -> XidEvent | None:
        if self._set is None:
            raise HardwareError("the XID event set is not open")
        try:
            data = pynvml.nvmlEventSetWait_v2(self._set, timeout_ms)
        except pynvml.NVMLError as error:
            code = getattr(error, "value", None)
            if code == pynvml.NVML_ERROR_TIMEOUT:
                return None
            if code == pynvml.NVML_ERROR_GPU_IS_LOST:
                # A registered GPU fell off the bus: the set answers this at once from now on.
                # Watch the others with a new set; the poll reports the lost one.
                self.close()
                self.open(self._gpu_count)
                return None
            raise HardwareError(f"waiting for XID events: {error}") from error
        index = self._index_of.get(_address(data.device))
        if index is None:
            with nvml_errors("an XID event's GPU"):
                index = int(pynvml.nvmlDeviceGetIndex(data.device))
        gi = int(data.gpuInstanceId)
        ci = int(data.computeInstanceId)
        return XidEvent(
            gpu_index=index,
            xid=int(data.eventData),
            gi_id=None if gi == _NO_INSTANCE else gi,
            ci_id=None if ci == _NO_INSTANCE else ci,
            at=time.time(),
        )

    def close(self) -> None:
        if self._set is not None:
            # NVML may already be shut down: nothing left to free then.
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlEventSetFree(self._set)
            self._set = None
