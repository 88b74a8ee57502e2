"""The CUDA driver API (``libcuda.so.1``) through ctypes, with error translation at this boundary.

Every call goes through ``CudaDriver``: a missing library or symbol, and every ``CUresult`` other
than ``CUDA_SUCCESS``, become ``ScrubError`` naming the call and the driver's error name. Nothing
above this module sees a ctypes or OS error. The one result that is not an error is
``CUDA_ERROR_OUT_OF_MEMORY`` from ``allocate`` (None): chunked allocation backs off from it.

The argument types in ``DRIVER_SIGNATURES`` are checked against ``cuda.h`` by
tests/scrub_cuda/test_ptx.py (CI has no driver, but it can have the header).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any, Final, TypeAlias

from agent.errors import ScrubError

# cuda.h values (CUDA 13.0 header; stable since they were introduced).
CUDA_SUCCESS: Final = 0
CUDA_ERROR_OUT_OF_MEMORY: Final = 2
CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: Final = 16
CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: Final = 81
CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: Final = 97
CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES: Final = 1
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: Final = 8
CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT: Final = 9
CU_SHAREDMEM_CARVEOUT_MAX_SHARED: Final = 100
_CU_JIT_ERROR_LOG_BUFFER: Final = 5
_CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES: Final = 6
_JIT_LOG_BYTES: Final = 16384

_VOID_P = ctypes.c_void_p
_INT_P = ctypes.POINTER(ctypes.c_int)
_SIZE_P = ctypes.POINTER(ctypes.c_size_t)
_U64_P = ctypes.POINTER(ctypes.c_uint64)

#: A kernel argument value as the launch passes it (scalars only; pointers are 64-bit integers).
KernelArgument: TypeAlias = ctypes.c_uint32 | ctypes.c_uint64

# Symbol -> argument types. The `_v2` names are the 64-bit ABI that cuda.h maps the plain names
# to; every driver since CUDA 3.2 exports them. Handles (contexts, modules, functions, events,
# streams) are opaque pointers; CUdeviceptr is an unsigned 64-bit integer. Memsets, copies,
# launches and event records all go to the legacy default stream (the `_v2` symbols, not the
# per-thread `_ptds` ones), so one pair of events brackets any of them.
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
    # destination, source, bytes: the benchmark's read-bandwidth baseline.
    "cuMemcpyDtoD_v2": (ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t),
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
        if self._function("cuGetErrorName")(code, ctypes.byref(text)) != CUDA_SUCCESS:
            return f"CUresult {code}"
        return (text.value or b"").decode("ascii", "replace") or f"CUresult {code}"

    def call(self, name: str, *arguments: Any, what: str = "") -> int:
        """Call ``name``; return its CUresult if it is success, raise ScrubError otherwise."""
        result = int(self._function(name)(*arguments))
        if result != CUDA_SUCCESS:
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
        if result == CUDA_ERROR_OUT_OF_MEMORY:
            return None
        if result != CUDA_SUCCESS:
            raise ScrubError(
                f"cuMemAlloc_v2 ({size} bytes) failed: {self.error_name(result)} ({result})"
            )
        return pointer.value

    def free(self, pointer: int) -> None:
        self.call("cuMemFree_v2", pointer, what=f"0x{pointer:x}")

    def memset_d32(self, pointer: int, word: int, count: int) -> None:
        self.call("cuMemsetD32_v2", pointer, word, count, what=f"0x{pointer:x}, {count} words")

    def copy_device_to_device(self, destination: int, source: int, size: int) -> None:
        self.call(
            "cuMemcpyDtoD_v2",
            destination,
            source,
            size,
            what=f"0x{source:x} to 0x{destination:x}, {size} bytes",
        )

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
        if result != CUDA_SUCCESS:
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
        blocks: int,
        threads: int,
        arguments: Sequence[KernelArgument],
        *,
        shared_bytes: int = 0,
        what: str,
    ) -> None:
        """Launch ``function`` on the legacy default stream, a one-dimensional grid."""
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
            what=what,
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
