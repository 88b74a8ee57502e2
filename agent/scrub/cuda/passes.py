"""The device work of a scrub: write a pattern, count on the device the words that differ from it,
and the on-chip pass over shared memory. Each returns what the device counted, never what the
host asked for, and the device time it took (CUDA events around the work).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from agent.errors import ScrubError
from agent.scrub.cuda.chunks import Chunk
from agent.scrub.cuda.device import Timer, device_buffer, event_timer
from agent.scrub.cuda.driver import (
    CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
    CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
    CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
    CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
    CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
    CU_SHAREDMEM_CARVEOUT_MAX_SHARED,
    CudaDriver,
)
from agent.scrub.cuda.kernels import (
    BLOCK_THREADS,
    SHARED_MEMORY_KERNEL,
    SM_SLOTS,
    VERIFY_BLOCKS_PER_SM,
    VERIFY_KERNEL,
    first_mismatch,
    launch,
)

# The block scheduler normally spreads one max-shared-memory block per idle SM, but nothing
# guarantees it: launch twice the SM count and repeat a few times until every SM was seen.
_SHARED_MEMORY_ROUNDS: Final = 4


def check_patterns(patterns: tuple[int, ...]) -> None:
    if not patterns:
        raise ScrubError("no scrub pattern given")
    for pattern in patterns:
        if not 0 <= pattern <= 0xFFFFFFFF:
            raise ScrubError(f"scrub pattern {pattern!r} is not a 32-bit word")


def verify_blocks(driver: CudaDriver, device: int) -> int:
    """Blocks per verify launch: enough to fill every SM of the device (or MIG instance)."""
    sm_count = driver.device_attribute(device, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
    return max(1, sm_count) * VERIFY_BLOCKS_PER_SM


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


def write(driver: CudaDriver, timer: Timer, chunks: Sequence[Chunk], pattern: int) -> float:
    timer.start()
    for chunk in chunks:
        driver.memset_d32(chunk.handle, pattern, chunk.size // 4)
    return timer.stop()


def verify(
    driver: CudaDriver,
    timer: Timer,
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
        launch(
            driver,
            kernel,
            VERIFY_KERNEL,
            max(1, min(blocks, needed)),
            [chunk.handle, words, pattern, tag, counters],
        )
    seconds = timer.stop()
    mismatched, examined, first = driver.read_u64(counters, 3)
    return VerifyCount(mismatched, examined, first_mismatch(first)), seconds


def clear_shared_memory(driver: CudaDriver, device: int, kernel: int) -> SharedMemoryReport:
    sm_count = driver.device_attribute(device, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
    per_sm = driver.device_attribute(
        device, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
    )
    opt_in = driver.device_attribute(device, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
    static = driver.kernel_attribute(kernel, CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
    # Dynamic shared memory beyond 48 KiB must be opted into per kernel (CUDA Programming Guide,
    # "Shared Memory" for compute capability 8.x/9.x); the opt-in maximum is the SM's shared
    # memory less the 1 KiB the driver reserves per block, so one block covers the SM.
    dynamic = (opt_in - static) // 4 * 4
    driver.set_kernel_attribute(kernel, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, dynamic)
    driver.set_kernel_attribute(
        kernel,
        CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
        CU_SHAREDMEM_CARVEOUT_MAX_SHARED,
    )
    reached: set[int] = set()
    blocks_run = bytes_cleared = mismatched = 0
    seconds = 0.0
    with (
        device_buffer(driver, 3 * 8, "on-chip counters") as counters,
        device_buffer(driver, SM_SLOTS * 4, "SM visit counters") as visits,
        event_timer(driver) as timer,
    ):
        for _ in range(_SHARED_MEMORY_ROUNDS):
            driver.memset_d32(counters, 0, 6)
            driver.memset_d32(visits, 0, SM_SLOTS)
            timer.start()
            launch(
                driver,
                kernel,
                SHARED_MEMORY_KERNEL,
                2 * sm_count,
                [dynamic // 4, counters, visits, SM_SLOTS],
                shared_bytes=dynamic,
            )
            seconds += timer.stop()
            round_mismatched, round_bytes, round_blocks = driver.read_u64(counters, 3)
            mismatched += round_mismatched
            bytes_cleared += round_bytes
            blocks_run += round_blocks
            reached.update(i for i, count in enumerate(driver.read_u32(visits, SM_SLOTS)) if count)
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
