"""Scrub a GPU or MIG partition through the CUDA driver API (``libcuda.so.1``, via ctypes).

Runs inside the scrub worker, which the daemon starts with ``CUDA_VISIBLE_DEVICES`` naming exactly
the partition (a GPU UUID or a MIG UUID), so CUDA device 0 is the partition. Nodes need the NVIDIA
driver only, no CUDA toolkit: the verify kernels ship as PTX (``native/scrub/scrub.ptx``, built by
``native/scrub/build.sh``) and the driver JIT-compiles them.

One scrub: take every byte of device memory the driver will give (``allocate_all``), then per
pattern write it with ``cuMemsetD32`` and count, on the device, the 32-bit words that differ from
it. What the driver keeps for itself (context, page tables, the kernels' module) cannot be
allocated and so is not verified: coverage reports it, it is never rounded up.
"""

from __future__ import annotations

import ctypes
import importlib.resources
import os
import re
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from agent.errors import ScrubError
from agent.scrub.base import PassResult, ScrubTarget

GIB: Final = 1 << 30
MIB: Final = 1 << 20

#: First allocation size. Large chunks keep the number of memsets and launches small.
FIRST_CHUNK_BYTES: Final = 2 * GIB
#: Smallest allocation tried. The driver hands out device memory in 2 MiB pages; when no 2 MiB
#: allocation succeeds, what remains free is partly used pages that smaller requests would share.
CHUNK_FLOOR_BYTES: Final = 2 * MIB

#: Entry points in scrub.ptx (tests/scrub_cuda/test_ptx.py checks the PTX declares them).
VERIFY_KERNEL: Final = "accelguard_scrub_verify"
SHARED_MEMORY_KERNEL: Final = "accelguard_clear_shared"
KERNEL_NAMES: Final = (VERIFY_KERNEL, SHARED_MEMORY_KERNEL)
#: Each kernel's parameters as scrub.cu declares them (pointers are 64-bit): the launch builds its
#: argument values from these types, and the PTX test checks the .entry declarations agree.
KERNEL_PARAMETERS: Final[dict[str, tuple[type[ctypes.c_uint32] | type[ctypes.c_uint64], ...]]] = {
    # words, word_count, pattern, chunk_tag, counters
    VERIFY_KERNEL: (
        ctypes.c_uint64,
        ctypes.c_uint64,
        ctypes.c_uint32,
        ctypes.c_uint64,
        ctypes.c_uint64,
    ),
    # shared_words, counters, sm_visits, sm_slots
    SHARED_MEMORY_KERNEL: (ctypes.c_uint32, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint32),
}
#: Both kernels are compiled with __launch_bounds__(256) (.maxntid 256 in the PTX).
BLOCK_THREADS: Final = 256

# 8 blocks of 256 threads is 2048 threads, the resident maximum of an sm_80/sm_90 SM; the verify
# kernel is a grid-stride loop, so more blocks would only queue.
_VERIFY_BLOCKS_PER_SM: Final = 8
# scrub.cu: first mismatch = (chunk tag << 40) | word index, so tags and indices must fit.
_WORD_INDEX_BITS: Final = 40
_MAX_CHUNK_TAG: Final = (1 << (64 - _WORD_INDEX_BITS)) - 1
_NO_MISMATCH: Final = (1 << 64) - 1
# %smid is below 1024 on every NVIDIA GPU so far (H100: 144 physical SMs); larger ids are not
# counted, which can only make the on-chip report say fewer SMs were reached.
_SM_SLOTS: Final = 1024
# The block scheduler normally spreads one max-shared-memory block per idle SM, but nothing
# guarantees it: launch twice the SM count and repeat a few times until every SM was seen.
_SHARED_MEMORY_ROUNDS: Final = 4

# cuda.h values (CUDA 13.0 header; stable since they were introduced).
_CUDA_SUCCESS: Final = 0
_CUDA_ERROR_OUT_OF_MEMORY: Final = 2
_CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: Final = 16
_CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: Final = 81
_CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: Final = 97
_CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES: Final = 1
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: Final = 8
_CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT: Final = 9
_CU_SHAREDMEM_CARVEOUT_MAX_SHARED: Final = 100
_CU_JIT_ERROR_LOG_BUFFER: Final = 5
_CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES: Final = 6
_JIT_LOG_BYTES: Final = 16384

_UUID_TEXT = re.compile(r"^(?:GPU|MIG)-([0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12})$")


# ---------------------------------------------------------------------------------------------
# Chunked allocation, independent of CUDA (CI tests it against a fake allocator: it has no GPU).


class ChunkAllocator(Protocol):
    """Device memory as ``allocate_all`` sees it."""

    def allocate(self, size: int) -> int | None:
        """A handle for ``size`` new bytes, or None when the device is out of memory."""
        ...

    def free(self, handle: int) -> None: ...


@dataclass(frozen=True)
class Chunk:
    handle: int
    size: int


def _round_down(value: int, multiple: int) -> int:
    return value - value % multiple


def allocate_all(
    allocator: ChunkAllocator,
    limit_bytes: int,
    *,
    first_chunk: int = FIRST_CHUNK_BYTES,
    floor: int = CHUNK_FLOOR_BYTES,
) -> list[Chunk]:
    """Allocate as much of ``limit_bytes`` as the allocator gives, largest chunks first.

    Starts at ``first_chunk`` (rounded down to a multiple of ``floor``); on out-of-memory halves
    the size (never below ``floor``) and carries on at the smaller size, so fragments left between
    large chunks are still taken. Stops when a ``floor``-sized request fails or ``limit_bytes``
    is reached. Every chunk size is a multiple of ``floor``. If the allocator raises, everything
    allocated so far is freed before the error propagates.
    """
    if floor <= 0 or floor % 4:
        raise ScrubError(f"chunk floor must be a positive multiple of 4 bytes (got {floor})")
    if first_chunk < floor:
        raise ScrubError(f"first chunk ({first_chunk} B) is smaller than the floor ({floor} B)")
    if limit_bytes < 0:
        raise ScrubError(f"allocation limit must not be negative (got {limit_bytes})")
    chunks: list[Chunk] = []
    allocated = 0
    size = _round_down(first_chunk, floor)
    try:
        while True:
            size = min(size, _round_down(limit_bytes - allocated, floor))
            if size < floor:
                break
            handle = allocator.allocate(size)
            if handle is not None:
                chunks.append(Chunk(handle, size))
                allocated += size
                continue
            if size == floor:
                break
            size = max(floor, _round_down(size // 2, floor))
    except BaseException:
        release_all(allocator, chunks)
        raise
    return chunks


def release_all(allocator: ChunkAllocator, chunks: list[Chunk]) -> None:
    """Free every chunk (all of them, even if one free fails; the first error is re-raised)."""
    first_error: BaseException | None = None
    while chunks:
        chunk = chunks.pop()
        try:
            allocator.free(chunk.handle)
        except Exception as error:  # noqa: BLE001 - keep freeing; the first error is re-raised
            first_error = first_error or error
    if first_error is not None:
        raise first_error


# ---------------------------------------------------------------------------------------------
# The CUDA driver API through ctypes.

_VOID_P = ctypes.c_void_p
_INT_P = ctypes.POINTER(ctypes.c_int)
_SIZE_P = ctypes.POINTER(ctypes.c_size_t)
_U64_P = ctypes.POINTER(ctypes.c_uint64)

# Symbol -> argument types. The `_v2` names are the 64-bit ABI that cuda.h maps the plain names
# to; every driver since CUDA 3.2 exports them. Handles (contexts, modules, functions, events,
# streams) are opaque pointers; CUdeviceptr is an unsigned 64-bit integer.
DRIVER_SIGNATURES: Final[dict[str, tuple[Any, ...]]] = {
    "cuGetErrorName": (ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)),
    "cuInit": (ctypes.c_uint,),
    "cuDriverGetVersion": (_INT_P,),
    "cuDeviceGetCount": (_INT_P,),
    "cuDeviceGet": (_INT_P, ctypes.c_int),
    "cuDeviceGetName": (ctypes.c_char_p, ctypes.c_int, ctypes.c_int),
    "cuDeviceGetUuid_v2": (ctypes.c_char_p, ctypes.c_int),
    "cuDeviceGetAttribute": (_INT_P, ctypes.c_int, ctypes.c_int),
    "cuDevicePrimaryCtxRetain": (ctypes.POINTER(_VOID_P), ctypes.c_int),
    "cuDevicePrimaryCtxRelease_v2": (ctypes.c_int,),
    "cuCtxSetCurrent": (_VOID_P,),
    "cuCtxSynchronize": (),
    "cuMemGetInfo_v2": (_SIZE_P, _SIZE_P),
    "cuMemAlloc_v2": (_U64_P, ctypes.c_size_t),
    "cuMemFree_v2": (ctypes.c_uint64,),
    "cuMemsetD32_v2": (ctypes.c_uint64, ctypes.c_uint, ctypes.c_size_t),
    "cuMemcpyDtoH_v2": (_VOID_P, ctypes.c_uint64, ctypes.c_size_t),
    "cuModuleLoadDataEx": (
        ctypes.POINTER(_VOID_P),
        ctypes.c_char_p,
        ctypes.c_uint,
        _INT_P,
        ctypes.POINTER(_VOID_P),
    ),
    "cuModuleGetFunction": (ctypes.POINTER(_VOID_P), _VOID_P, ctypes.c_char_p),
    "cuModuleUnload": (_VOID_P,),
    "cuFuncGetAttribute": (_INT_P, ctypes.c_int, _VOID_P),
    "cuFuncSetAttribute": (_VOID_P, ctypes.c_int, ctypes.c_int),
    "cuLaunchKernel": (
        _VOID_P,
        *(ctypes.c_uint,) * 7,  # grid x/y/z, block x/y/z, dynamic shared memory bytes
        _VOID_P,  # stream: NULL is the legacy default stream, as for cuMemsetD32_v2
        ctypes.POINTER(_VOID_P),
        ctypes.POINTER(_VOID_P),
    ),
    "cuEventCreate": (ctypes.POINTER(_VOID_P), ctypes.c_uint),
    "cuEventRecord": (_VOID_P, _VOID_P),
    "cuEventSynchronize": (_VOID_P,),
    # The original symbol, not cuEventElapsedTime_v2 (CUDA 12.8+): older drivers lack the latter.
    "cuEventElapsedTime": (ctypes.POINTER(ctypes.c_float), _VOID_P, _VOID_P),
    "cuEventDestroy_v2": (_VOID_P,),
}


class CudaDriver:
    """libcuda.so.1 with typed calls; any CUresult other than CUDA_SUCCESS raises ScrubError."""

    def __init__(self, library: str = "libcuda.so.1") -> None:
        try:
            self._library = ctypes.CDLL(library)
        except OSError as error:
            raise ScrubError(
                f"cannot load the CUDA driver library {library} ({error}): is the NVIDIA driver "
                "installed on this node?"
            ) from error
        self._functions: dict[str, Any] = {}

    def _function(self, name: str) -> Any:
        function = self._functions.get(name)
        if function is None:
            try:
                function = getattr(self._library, name)
            except AttributeError as error:
                raise ScrubError(
                    f"the CUDA driver does not export {name}: the driver is too old for accelguard"
                ) from error
            function.argtypes = DRIVER_SIGNATURES[name]
            function.restype = ctypes.c_int
            self._functions[name] = function
        return function

    def has(self, name: str) -> bool:
        return hasattr(self._library, name)

    def error_name(self, code: int) -> str:
        text = ctypes.c_char_p()
        if self._function("cuGetErrorName")(code, ctypes.byref(text)) != _CUDA_SUCCESS:
            return f"CUresult {code}"
        return (text.value or b"").decode("ascii", "replace") or f"CUresult {code}"

    def call(self, name: str, *arguments: Any, what: str = "") -> int:
        """Call ``name``; return its CUresult if it is success, raise ScrubError otherwise."""
        result = int(self._function(name)(*arguments))
        if result != _CUDA_SUCCESS:
            raise ScrubError(
                f"{name}{f' ({what})' if what else ''} failed: {self.error_name(result)} ({result})"
            )
        return result

    # -- device and context ---------------------------------------------------------------
    def init(self) -> None:
        self.call("cuInit", 0)

    def driver_version(self) -> int:
        version = ctypes.c_int()
        self.call("cuDriverGetVersion", ctypes.byref(version))
        return version.value

    def device_count(self) -> int:
        count = ctypes.c_int()
        self.call("cuDeviceGetCount", ctypes.byref(count))
        return count.value

    def device(self, ordinal: int) -> int:
        device = ctypes.c_int()
        self.call("cuDeviceGet", ctypes.byref(device), ordinal, what=f"ordinal {ordinal}")
        return device.value

    def device_name(self, device: int) -> str:
        name = ctypes.create_string_buffer(256)
        self.call("cuDeviceGetName", name, len(name), device)
        return name.value.decode("utf-8", "replace")

    def device_uuid(self, device: int) -> bytes | None:
        """The 16 UUID bytes (the MIG UUID for a MIG device), None if the driver predates _v2."""
        if not self.has("cuDeviceGetUuid_v2"):
            return None
        uuid = ctypes.create_string_buffer(16)
        self.call("cuDeviceGetUuid_v2", uuid, device)
        return uuid.raw

    def device_attribute(self, device: int, attribute: int) -> int:
        value = ctypes.c_int()
        self.call(
            "cuDeviceGetAttribute", ctypes.byref(value), attribute, device, what=f"#{attribute}"
        )
        return value.value

    def primary_context_retain(self, device: int) -> int:
        context = _VOID_P()
        self.call("cuDevicePrimaryCtxRetain", ctypes.byref(context), device)
        self.call("cuCtxSetCurrent", context)
        return context.value or 0

    def primary_context_release(self, device: int) -> None:
        self.call("cuDevicePrimaryCtxRelease_v2", device)

    def synchronize(self) -> None:
        self.call("cuCtxSynchronize")

    # -- memory ---------------------------------------------------------------------------
    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of the current context's device."""
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self.call("cuMemGetInfo_v2", ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value

    def allocate(self, size: int) -> int | None:
        """A device pointer, or None when the device is out of memory (a normal, non-sticky
        error the chunked allocation backs off from)."""
        pointer = ctypes.c_uint64()
        result = int(self._function("cuMemAlloc_v2")(ctypes.byref(pointer), size))
        if result == _CUDA_ERROR_OUT_OF_MEMORY:
            return None
        if result != _CUDA_SUCCESS:
            raise ScrubError(
                f"cuMemAlloc_v2 ({size} bytes) failed: {self.error_name(result)} ({result})"
            )
        return pointer.value

    def free(self, pointer: int) -> None:
        self.call("cuMemFree_v2", pointer, what=f"0x{pointer:x}")

    def memset_d32(self, pointer: int, word: int, count: int) -> None:
        self.call("cuMemsetD32_v2", pointer, word, count, what=f"0x{pointer:x}, {count} words")

    def read_u64(self, pointer: int, count: int) -> list[int]:
        values = (ctypes.c_uint64 * count)()
        self.call("cuMemcpyDtoH_v2", values, pointer, ctypes.sizeof(values))
        return list(values)

    def read_u32(self, pointer: int, count: int) -> list[int]:
        values = (ctypes.c_uint32 * count)()
        self.call("cuMemcpyDtoH_v2", values, pointer, ctypes.sizeof(values))
        return list(values)

    # -- modules and kernels --------------------------------------------------------------
    def load_module(self, ptx: bytes) -> int:
        """Load PTX text (JIT-compiled by the driver); a JIT failure carries the driver's log."""
        module = _VOID_P()
        log = ctypes.create_string_buffer(_JIT_LOG_BYTES)
        options = (ctypes.c_int * 2)(_CU_JIT_ERROR_LOG_BUFFER, _CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES)
        # CUjit_option values are passed in the void* array itself, not pointed to (cuda.h).
        values = (_VOID_P * 2)(ctypes.addressof(log), _JIT_LOG_BYTES)
        # c_char_p from bytes adds the NUL terminator cuModuleLoadDataEx needs for PTX text.
        result = int(
            self._function("cuModuleLoadDataEx")(ctypes.byref(module), ptx, 2, options, values)
        )
        if result != _CUDA_SUCCESS:
            jit_log = log.value.decode("utf-8", "replace").strip()
            raise ScrubError(
                f"cuModuleLoadDataEx (scrub.ptx) failed: {self.error_name(result)} ({result})"
                + (f"; JIT log: {jit_log}" if jit_log else "")
            )
        return module.value or 0

    def unload_module(self, module: int) -> None:
        self.call("cuModuleUnload", module)

    def kernel(self, module: int, name: str) -> int:
        function = _VOID_P()
        self.call("cuModuleGetFunction", ctypes.byref(function), module, name.encode(), what=name)
        return function.value or 0

    def kernel_attribute(self, function: int, attribute: int) -> int:
        value = ctypes.c_int()
        self.call("cuFuncGetAttribute", ctypes.byref(value), attribute, function)
        return value.value

    def set_kernel_attribute(self, function: int, attribute: int, value: int) -> None:
        self.call("cuFuncSetAttribute", function, attribute, value, what=f"#{attribute}={value}")

    def launch(
        self,
        function: int,
        kernel: str,
        blocks: int,
        threads: int,
        values: Sequence[int],
        shared_bytes: int = 0,
    ) -> None:
        """Launch ``function`` (the entry ``kernel`` of scrub.ptx) on the default stream."""
        types = KERNEL_PARAMETERS[kernel]
        if len(values) != len(types):
            raise ScrubError(f"{kernel} takes {len(types)} arguments, not {len(values)}")
        arguments = [kind(value) for kind, value in zip(types, values, strict=True)]
        # kernelParams: one pointer per kernel parameter, to a value of the parameter's size; the
        # driver copies the values during the call, so the ctypes objects may die afterwards.
        pointers = (_VOID_P * len(arguments))(*(ctypes.addressof(a) for a in arguments))
        self.call(
            "cuLaunchKernel",
            function,
            blocks,
            1,
            1,
            threads,
            1,
            1,
            shared_bytes,
            None,
            pointers,
            None,
            what=f"{kernel}, {blocks}x{threads} threads, {shared_bytes} B shared",
        )

    # -- timing ---------------------------------------------------------------------------
    def event(self) -> int:
        event = _VOID_P()
        self.call("cuEventCreate", ctypes.byref(event), 0)
        return event.value or 0

    def record(self, event: int) -> None:
        self.call("cuEventRecord", event, None)

    def seconds_between(self, start: int, end: int) -> float:
        """Device time from ``start`` to ``end`` (waits for ``end``); errors of the work in
        between (an illegal address in a kernel, say) surface here."""
        self.call("cuEventSynchronize", end)
        milliseconds = ctypes.c_float()
        self.call("cuEventElapsedTime", ctypes.byref(milliseconds), start, end)
        return milliseconds.value / 1000.0

    def destroy_event(self, event: int) -> None:
        self.call("cuEventDestroy_v2", event)


class DeviceAllocator:
    """``ChunkAllocator`` over cuMemAlloc/cuMemFree in the current context."""

    def __init__(self, driver: CudaDriver) -> None:
        self._driver = driver

    def allocate(self, size: int) -> int | None:
        return self._driver.allocate(size)

    def free(self, handle: int) -> None:
        self._driver.free(handle)


# ---------------------------------------------------------------------------------------------
# Kernels and the scrub itself.


def scrub_ptx() -> bytes:
    """The verify kernels' PTX.

    Looked up first as package data (``agent/scrub/scrub.ptx``, for an installed wheel that
    includes ``native/scrub/scrub.ptx`` under that name), then in the repository checkout this
    module runs from (``native/scrub/scrub.ptx``).
    """
    packaged = importlib.resources.files("agent.scrub").joinpath("scrub.ptx")
    checkout = Path(__file__).resolve().parents[2] / "native" / "scrub" / "scrub.ptx"
    for candidate in (packaged, checkout):
        try:
            if candidate.is_file():
                return candidate.read_bytes()
        except OSError as error:
            raise ScrubError(f"cannot read the scrub kernels at {candidate}: {error}") from error
    raise ScrubError(
        f"scrub kernels not found: neither {packaged} nor {checkout} exists (build them with "
        "native/scrub/build.sh, or install a package that ships agent/scrub/scrub.ptx)"
    )


@dataclass(frozen=True)
class _Kernels:
    module: int
    verify: int
    clear_shared: int


@dataclass(frozen=True)
class VerifyCount:
    mismatched_words: int
    examined_words: int
    # (chunk index, word index in the chunk) of the lowest differing word, if any.
    first_mismatch: tuple[int, int] | None


@dataclass(frozen=True)
class SharedMemoryReport:
    """The on-chip pass: shared memory filled, cleared and read back on every SM."""

    bytes_per_block: int
    shared_bytes_per_sm: int
    sm_count: int
    sms_reached: int
    blocks_run: int
    bytes_cleared: int
    mismatched_words: int
    seconds: float

    @property
    def clean(self) -> bool:
        return self.mismatched_words == 0 and self.sms_reached >= self.sm_count


@dataclass(frozen=True)
class CudaScrubReport:
    """What the backend saw, beyond the PassResults (for ScrubResult.detail and the record)."""

    device_name: str
    device_uuid: str
    driver_version: int
    memory_free_bytes: int
    memory_total_bytes: int
    allocated_bytes: int
    chunk_count: int
    smallest_chunk_bytes: int
    first_mismatches: dict[int, tuple[int, int]] = field(default_factory=dict)
    shared_memory: SharedMemoryReport | None = None

    def describe(self, target_total_bytes: int) -> str:
        unreached = max(0, target_total_bytes - self.allocated_bytes)
        parts = [
            f"{self.device_name} {self.device_uuid} (driver {self.driver_version})",
            f"allocated {self.allocated_bytes} of {target_total_bytes} B in {self.chunk_count} "
            f"chunks (smallest {self.smallest_chunk_bytes} B)",
            f"{unreached} B not allocatable (held by the driver: context, page tables, kernels) "
            "and not verified",
        ]
        for pattern, (chunk, word) in sorted(self.first_mismatches.items()):
            parts.append(f"pattern 0x{pattern:08x}: first mismatch in chunk {chunk} at word {word}")
        if self.shared_memory is not None:
            shared = self.shared_memory
            parts.append(
                f"shared memory: {shared.bytes_per_block} B/block on {shared.sms_reached} of "
                f"{shared.sm_count} SMs ({shared.shared_bytes_per_sm} B/SM), "
                f"{shared.mismatched_words} words did not read back"
            )
        return "; ".join(parts)


def _format_uuid(raw: bytes | None) -> str:
    if raw is None:
        return "uuid unknown"
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


@contextmanager
def _released_after(release: Callable[[], object]) -> Iterator[None]:
    """Run ``release`` when the block ends. If the block failed, a failure of ``release`` too
    (a sticky CUDA error fails every later call) must not hide the first error, which says what
    actually went wrong."""
    try:
        yield
    except BaseException:
        with suppress(ScrubError):
            release()
        raise
    release()


@contextmanager
def _device_context(driver: CudaDriver, target: ScrubTarget | None = None) -> Iterator[int]:
    """CUDA device 0 (checked to be ``target`` first, if given) with its primary context
    current; releasing it destroys it, since this worker process is its only user."""
    driver.init()
    device = driver.device(0)
    if target is not None:
        _check_device_identity(driver, device, target)
    driver.primary_context_retain(device)
    with _released_after(lambda: driver.primary_context_release(device)):
        yield device


@contextmanager
def _device_buffer(driver: CudaDriver, size: int, what: str) -> Iterator[int]:
    pointer = driver.allocate(size)
    if pointer is None:
        raise ScrubError(f"no device memory left for the {what} ({size} B)")
    with _released_after(lambda: driver.free(pointer)):
        yield pointer


@contextmanager
def _loaded_kernels(driver: CudaDriver) -> Iterator[_Kernels]:
    module = driver.load_module(scrub_ptx())
    with _released_after(lambda: driver.unload_module(module)):
        yield _Kernels(
            module=module,
            verify=driver.kernel(module, VERIFY_KERNEL),
            clear_shared=driver.kernel(module, SHARED_MEMORY_KERNEL),
        )


@contextmanager
def _all_memory(
    driver: CudaDriver, free_bytes: int, total_bytes: int, size_limit: int | None = None
) -> Iterator[list[Chunk]]:
    """All the device memory the driver gives, up to ``size_limit``; freed on the way out."""
    allocator = DeviceAllocator(driver)
    limit = total_bytes if size_limit is None else min(total_bytes, size_limit)
    # cuMemGetInfo's free figure is where to start, not a promise (fragmentation, the driver's
    # own reservations): allocate_all backs off from it.
    first_chunk = max(CHUNK_FLOOR_BYTES, min(free_bytes, FIRST_CHUNK_BYTES))
    chunks = allocate_all(allocator, limit, first_chunk=first_chunk)
    with _released_after(lambda: release_all(allocator, chunks)):
        if len(chunks) - 1 > _MAX_CHUNK_TAG:
            raise ScrubError(f"{len(chunks)} chunks exceed the verify kernel's chunk tag range")
        yield chunks


class _Timer:
    """A pair of CUDA events on the legacy default stream, where memsets and launches go."""

    def __init__(self, driver: CudaDriver) -> None:
        self._driver = driver
        self._start = driver.event()
        try:
            self._end = driver.event()
        except ScrubError:
            driver.destroy_event(self._start)
            raise

    def start(self) -> None:
        self._driver.record(self._start)

    def stop(self) -> float:
        self._driver.record(self._end)
        return self._driver.seconds_between(self._start, self._end)

    def close(self) -> None:
        self._driver.destroy_event(self._start)
        self._driver.destroy_event(self._end)


@contextmanager
def _timer(driver: CudaDriver) -> Iterator[_Timer]:
    timer = _Timer(driver)
    with _released_after(timer.close):
        yield timer


def _write(driver: CudaDriver, timer: _Timer, chunks: Sequence[Chunk], pattern: int) -> float:
    timer.start()
    for chunk in chunks:
        driver.memset_d32(chunk.handle, pattern, chunk.size // 4)
    return timer.stop()


def _verify(
    driver: CudaDriver,
    timer: _Timer,
    kernel: int,
    blocks: int,
    counters: int,
    chunks: Sequence[Chunk],
    pattern: int,
) -> tuple[VerifyCount, float]:
    driver.memset_d32(counters, 0, 4)  # mismatched words, examined words
    driver.memset_d32(counters + 16, 0xFFFFFFFF, 2)  # first mismatch: none yet
    timer.start()
    for tag, chunk in enumerate(chunks):
        words = chunk.size // 4
        needed = -(-words // (4 * BLOCK_THREADS))
        driver.launch(
            kernel,
            VERIFY_KERNEL,
            max(1, min(blocks, needed)),
            BLOCK_THREADS,
            [chunk.handle, words, pattern, tag, counters],
        )
    seconds = timer.stop()
    mismatched, examined, first = driver.read_u64(counters, 3)
    first_mismatch = None
    if first != _NO_MISMATCH:
        first_mismatch = (first >> _WORD_INDEX_BITS, first & ((1 << _WORD_INDEX_BITS) - 1))
    return VerifyCount(mismatched, examined, first_mismatch), seconds


def _clear_shared_memory(driver: CudaDriver, device: int, kernel: int) -> SharedMemoryReport:
    sm_count = driver.device_attribute(device, _CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
    per_sm = driver.device_attribute(
        device, _CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
    )
    opt_in = driver.device_attribute(device, _CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
    static = driver.kernel_attribute(kernel, _CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
    # Dynamic shared memory beyond 48 KiB must be opted into per kernel (CUDA Programming Guide,
    # "Shared Memory" for compute capability 8.x/9.x); the opt-in maximum is the SM's shared
    # memory less the 1 KiB the driver reserves per block, so one block covers the SM.
    dynamic = _round_down(opt_in - static, 4)
    driver.set_kernel_attribute(kernel, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, dynamic)
    driver.set_kernel_attribute(
        kernel,
        _CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
        _CU_SHAREDMEM_CARVEOUT_MAX_SHARED,
    )
    reached: set[int] = set()
    blocks_run = bytes_cleared = mismatched = 0
    seconds = 0.0
    with (
        _device_buffer(driver, 3 * 8, "on-chip counters") as counters,
        _device_buffer(driver, _SM_SLOTS * 4, "SM visit counters") as visits,
        _timer(driver) as timer,
    ):
        for _ in range(_SHARED_MEMORY_ROUNDS):
            driver.memset_d32(counters, 0, 6)
            driver.memset_d32(visits, 0, _SM_SLOTS)
            timer.start()
            driver.launch(
                kernel,
                SHARED_MEMORY_KERNEL,
                2 * sm_count,
                BLOCK_THREADS,
                [dynamic // 4, counters, visits, _SM_SLOTS],
                shared_bytes=dynamic,
            )
            seconds += timer.stop()
            round_mismatched, round_bytes, round_blocks = driver.read_u64(counters, 3)
            mismatched += round_mismatched
            bytes_cleared += round_bytes
            blocks_run += round_blocks
            reached.update(i for i, count in enumerate(driver.read_u32(visits, _SM_SLOTS)) if count)
            if len(reached) >= sm_count:
                break
    return SharedMemoryReport(
        bytes_per_block=dynamic,
        shared_bytes_per_sm=per_sm,
        sm_count=sm_count,
        sms_reached=len(reached),
        blocks_run=blocks_run,
        bytes_cleared=bytes_cleared,
        mismatched_words=mismatched,
        seconds=seconds,
    )


def _check_patterns(patterns: tuple[int, ...]) -> None:
    if not patterns:
        raise ScrubError("no scrub pattern given")
    for pattern in patterns:
        if not 0 <= pattern <= 0xFFFFFFFF:
            raise ScrubError(f"scrub pattern {pattern!r} is not a 32-bit word")


def _check_visible_device(target: ScrubTarget) -> None:
    """The worker's environment must name the partition, before CUDA is even initialised."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if visible != target.visible_device:
        raise ScrubError(
            f"CUDA_VISIBLE_DEVICES is {visible!r}, not the partition's {target.visible_device!r}: "
            "the scrub worker must be started with it set to the partition"
        )


def _check_device_identity(driver: CudaDriver, device: int, target: ScrubTarget) -> None:
    """Refuse to scrub anything but the target: a certificate for partition A must never be
    issued for a scrub of B (or of A and B together)."""
    count = driver.device_count()
    if count != 1:
        raise ScrubError(
            f"CUDA sees {count} devices for {target.visible_device!r}; expected exactly one"
        )
    raw = driver.device_uuid(device)
    expected = _UUID_TEXT.match(target.visible_device)
    if (
        raw is not None
        and expected is not None
        and raw.hex() != expected.group(1).replace("-", "").lower()
    ):
        raise ScrubError(
            f"CUDA device 0 is {_format_uuid(raw)}, not {target.visible_device}: refusing to "
            "scrub a different device"
        )


@dataclass(frozen=True)
class _PassesOutcome:
    passes: tuple[PassResult, ...]
    first_mismatches: dict[int, tuple[int, int]]


def _run_passes(
    driver: CudaDriver,
    timer: _Timer,
    kernels: _Kernels,
    counters: int,
    chunks: Sequence[Chunk],
    patterns: tuple[int, ...],
    verify_blocks: int,
) -> _PassesOutcome:
    written = sum(chunk.size for chunk in chunks)
    passes: list[PassResult] = []
    first_mismatches: dict[int, tuple[int, int]] = {}
    for pattern in patterns:
        write_seconds = _write(driver, timer, chunks, pattern)
        count, verify_seconds = _verify(
            driver, timer, kernels.verify, verify_blocks, counters, chunks, pattern
        )
        if count.first_mismatch is not None:
            first_mismatches[pattern] = count.first_mismatch
        passes.append(
            PassResult(
                pattern=pattern,
                bytes_written=written,
                # What the kernel counted, not what the host asked it to read.
                bytes_verified=count.examined_words * 4,
                write_seconds=write_seconds,
                verify_seconds=verify_seconds,
                mismatched_bytes=count.mismatched_words * 4,
            )
        )
    return _PassesOutcome(tuple(passes), first_mismatches)


class CudaScrubBackend:
    """``ScrubBackend`` on a real GPU or MIG instance (device 0 of this worker process).

    ``shared_memory=True`` adds the on-chip pass (LeftoverLocals, CVE-2023-4969). ScrubResult has
    no field for it: its outcome is in ``last_report``/``detail``, and a pass that does not prove
    every SM's shared memory clear raises ScrubError (fail closed) after memory is released.
    """

    name = "cuda"

    def __init__(self, *, shared_memory: bool = False, library: str = "libcuda.so.1") -> None:
        self._shared_memory = shared_memory
        self._library = library
        self._target_total_bytes = 0
        self.last_report: CudaScrubReport | None = None

    @property
    def detail(self) -> str:
        """One line about the last scrub (for ScrubResult.detail); empty before the first."""
        if self.last_report is None:
            return ""
        return self.last_report.describe(self._target_total_bytes)

    def scrub(self, target: ScrubTarget, patterns: tuple[int, ...]) -> tuple[PassResult, ...]:
        _check_patterns(patterns)
        _check_visible_device(target)
        self.last_report = None
        self._target_total_bytes = target.total_bytes
        driver = CudaDriver(self._library)
        with _device_context(driver, target) as device:
            uuid = _format_uuid(driver.device_uuid(device))
            sm_count = driver.device_attribute(device, _CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            with (
                _loaded_kernels(driver) as kernels,
                _device_buffer(driver, 3 * 8, "verify counters") as counters,
                _timer(driver) as timer,
            ):
                shared = None
                if self._shared_memory:
                    shared = _clear_shared_memory(driver, device, kernels.clear_shared)
                # Taken after every small allocation of ours: the rest is what gets scrubbed.
                free_bytes, total_bytes = driver.memory_info()
                with _all_memory(driver, free_bytes, total_bytes) as chunks:
                    if not chunks:
                        raise ScrubError(
                            f"could not allocate any device memory on {uuid} ({free_bytes} B "
                            "reported free): is a process still using the partition?"
                        )
                    outcome = _run_passes(
                        driver,
                        timer,
                        kernels,
                        counters,
                        chunks,
                        patterns,
                        max(1, sm_count) * _VERIFY_BLOCKS_PER_SM,
                    )
                    self.last_report = CudaScrubReport(
                        device_name=driver.device_name(device),
                        device_uuid=uuid,
                        driver_version=driver.driver_version(),
                        memory_free_bytes=free_bytes,
                        memory_total_bytes=total_bytes,
                        allocated_bytes=sum(chunk.size for chunk in chunks),
                        chunk_count=len(chunks),
                        smallest_chunk_bytes=min(chunk.size for chunk in chunks),
                        first_mismatches=outcome.first_mismatches,
                        shared_memory=shared,
                    )
        if shared is not None and not shared.clean:
            raise ScrubError(f"on-chip shared memory was not proven clear: {self.detail}")
        return outcome.passes


# ---------------------------------------------------------------------------------------------
# Benchmark: the scrub's write and verify against the device's own cuMemsetD32 bandwidth.


def memset_bandwidth(
    driver: CudaDriver, chunks: Sequence[Chunk], pattern: int = 0, rounds: int = 3
) -> float:
    """Bytes/s of bare cuMemsetD32 calls over ``chunks`` (median of ``rounds``): the baseline."""
    size = sum(chunk.size for chunk in chunks)
    samples = []
    with _timer(driver) as timer:
        for _ in range(rounds):
            timer.start()
            for chunk in chunks:
                driver.call("cuMemsetD32_v2", chunk.handle, pattern, chunk.size // 4)
            samples.append(timer.stop())
    return size / max(statistics.median(samples), 1e-9)


def benchmark_cuda(size_limit: int | None = None, rounds: int = 3) -> dict[str, Any]:
    """Memset baseline, scrub write and scrub verify bytes/s on one allocation of device 0.

    ``size_limit`` caps the allocation (default: all the memory the driver gives). The ratios are
    the result: they compare the scrub with the same device's memset in the same run.
    """
    if rounds < 1:
        raise ScrubError(f"benchmark rounds must be at least 1 (got {rounds})")
    driver = CudaDriver()
    with _device_context(driver) as device:
        sm_count = driver.device_attribute(device, _CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        blocks = max(1, sm_count) * _VERIFY_BLOCKS_PER_SM
        with (
            _loaded_kernels(driver) as kernels,
            _device_buffer(driver, 3 * 8, "verify counters") as counters,
            _timer(driver) as timer,
        ):
            free_bytes, total_bytes = driver.memory_info()
            with _all_memory(driver, free_bytes, total_bytes, size_limit) as chunks:
                if not chunks:
                    raise ScrubError(f"no device memory could be allocated ({free_bytes} B free)")
                size = sum(chunk.size for chunk in chunks)
                # Warm-up: the first memset and launch pay for page mapping and the PTX JIT.
                _write(driver, timer, chunks, 0)
                _verify(driver, timer, kernels.verify, blocks, counters, chunks, 0)
                baseline = memset_bandwidth(driver, chunks, 0, rounds)
                writes, verifies = [], []
                for _ in range(rounds):
                    writes.append(_write(driver, timer, chunks, 0))
                    verified, seconds = _verify(
                        driver, timer, kernels.verify, blocks, counters, chunks, 0
                    )
                    if verified.examined_words * 4 != size or verified.mismatched_words:
                        raise ScrubError(
                            f"benchmark verify examined {verified.examined_words * 4} of {size} B "
                            f"and found {verified.mismatched_words} mismatched words"
                        )
                    verifies.append(seconds)
                write = size / max(statistics.median(writes), 1e-9)
                verify = size / max(statistics.median(verifies), 1e-9)
                return {
                    "device": driver.device_name(device),
                    "driver_version": driver.driver_version(),
                    "bytes": size,
                    "chunks": len(chunks),
                    "memory_total_bytes": total_bytes,
                    "rounds": rounds,
                    "memset_bytes_per_s": baseline,
                    "scrub_write_bytes_per_s": write,
                    "scrub_verify_bytes_per_s": verify,
                    "write_ratio": write / baseline,
                    "verify_ratio": verify / baseline,
                }


# ---------------------------------------------------------------------------------------------
# Diagnostics: what a tenant arriving now could read (hwtests plant a word, scrub, then look).


@dataclass(frozen=True)
class MemorySurvey:
    allocated_bytes: int
    examined_bytes: int
    matching_words: int
    memory_total_bytes: int


def fill_free_memory(word: int) -> int:
    """Write ``word`` over all the memory device 0's driver will allocate, free it, return the
    bytes written: the traces a departing tenant leaves behind."""
    _check_patterns((word,))
    driver = CudaDriver()
    with _device_context(driver), _timer(driver) as timer:
        free_bytes, total_bytes = driver.memory_info()
        with _all_memory(driver, free_bytes, total_bytes) as chunks:
            _write(driver, timer, chunks, word)
            return sum(chunk.size for chunk in chunks)


def survey_free_memory(word: int) -> MemorySurvey:
    """Read, without writing, all the memory device 0's driver will allocate and count the 32-bit
    words equal to ``word``."""
    _check_patterns((word,))
    driver = CudaDriver()
    with _device_context(driver) as device:
        blocks = driver.device_attribute(device, _CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT) * (
            _VERIFY_BLOCKS_PER_SM
        )
        with (
            _loaded_kernels(driver) as kernels,
            _device_buffer(driver, 3 * 8, "verify counters") as counters,
            _timer(driver) as timer,
        ):
            free_bytes, total_bytes = driver.memory_info()
            with _all_memory(driver, free_bytes, total_bytes) as chunks:
                count, _ = _verify(
                    driver, timer, kernels.verify, max(1, blocks), counters, chunks, word
                )
                return MemorySurvey(
                    allocated_bytes=sum(chunk.size for chunk in chunks),
                    examined_bytes=count.examined_words * 4,
                    matching_words=count.examined_words - count.mismatched_words,
                    memory_total_bytes=total_bytes,
                )
