"""CUDA device 0 and what a scrub holds on it, each a context manager that releases it when its
block ends.

The worker process is started with ``CUDA_VISIBLE_DEVICES`` naming exactly one partition, so CUDA
device 0 is that partition; ``device_context`` checks it is the one named before anything runs on
it. Callers nest the blocks in the order they take the resources, so releases run in reverse, and
a failing release never hides the error that ended the block (``released_after``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from agent.errors import ScrubError
from agent.scrub.cuda.chunks import (
    CHUNK_FLOOR_BYTES,
    FIRST_CHUNK_BYTES,
    Chunk,
    allocate_all,
    release_all,
)
from agent.scrub.cuda.driver import CudaDriver
from agent.scrub.cuda.kernels import (
    MAX_CHUNK_TAG,
    SHARED_MEMORY_KERNEL,
    VERIFY_KERNEL,
    scrub_ptx,
)
from agent.scrub.model import ScrubTarget

_UUID_TEXT = re.compile(r"^(?:GPU|MIG)-([0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12})$")


def format_uuid(raw: bytes | None) -> str:
    if raw is None:
        return "uuid unknown"
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


@contextmanager
def released_after(release: Callable[[], object]) -> Iterator[None]:
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
            f"CUDA device 0 is {format_uuid(raw)}, not {target.visible_device}: refusing to "
            "scrub a different device"
        )


@contextmanager
def device_context(driver: CudaDriver, target: ScrubTarget | None = None) -> Iterator[int]:
    """CUDA device 0 (checked to be ``target`` first, if given) with its primary context
    current; releasing it destroys it, since this worker process is its only user."""
    driver.init()
    device = driver.device(0)
    if target is not None:
        _check_device_identity(driver, device, target)
    driver.primary_context_retain(device)
    with released_after(lambda: driver.primary_context_release(device)):
        yield device


@contextmanager
def device_buffer(driver: CudaDriver, size: int, what: str) -> Iterator[int]:
    pointer = driver.allocate(size)
    if pointer is None:
        raise ScrubError(f"no device memory left for the {what} ({size} B)")
    with released_after(lambda: driver.free(pointer)):
        yield pointer


@dataclass(frozen=True)
class Kernels:
    module: int
    verify: int
    clear_shared: int


@contextmanager
def loaded_kernels(driver: CudaDriver) -> Iterator[Kernels]:
    module = driver.load_module(scrub_ptx())
    with released_after(lambda: driver.unload_module(module)):
        yield Kernels(
            module=module,
            verify=driver.kernel(module, VERIFY_KERNEL),
            clear_shared=driver.kernel(module, SHARED_MEMORY_KERNEL),
        )


class DeviceAllocator:
    """``ChunkAllocator`` over cuMemAlloc/cuMemFree in the current context."""

    def __init__(self, driver: CudaDriver) -> None:
        self._driver = driver

    def allocate(self, size: int) -> int | None:
        return self._driver.allocate(size)

    def free(self, handle: int) -> None:
        self._driver.free(handle)


@contextmanager
def all_memory(
    driver: CudaDriver, free_bytes: int, total_bytes: int, size_limit: int | None = None
) -> Iterator[list[Chunk]]:
    """All the device memory the driver gives, up to ``size_limit``; freed on the way out."""
    allocator = DeviceAllocator(driver)
    limit = total_bytes if size_limit is None else min(total_bytes, size_limit)
    # cuMemGetInfo's free figure is where to start, not a promise (fragmentation, the driver's
    # own reservations): allocate_all backs off from it.
    first_chunk = max(CHUNK_FLOOR_BYTES, min(free_bytes, FIRST_CHUNK_BYTES))
    chunks = allocate_all(allocator, limit, first_chunk=first_chunk)
    with released_after(lambda: release_all(allocator, chunks)):
        if len(chunks) - 1 > MAX_CHUNK_TAG:
            raise ScrubError(f"{len(chunks)} chunks exceed the verify kernel's chunk tag range")
        yield chunks


class Timer:
    """A pair of CUDA events on the legacy default stream, where memsets, copies and launches go."""

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
def event_timer(driver: CudaDriver) -> Iterator[Timer]:
    timer = Timer(driver)
    with released_after(timer.close):
        yield timer
