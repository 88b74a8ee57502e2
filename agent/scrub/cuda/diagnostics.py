"""What a tenant arriving now could read: plant a word in all allocatable memory, or count it.

Used by hwtests/test_cuda_scrub.py (plant, scrub, look again; and the control without a scrub).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.scrub.cuda.device import (
    all_memory,
    device_buffer,
    device_context,
    event_timer,
    loaded_kernels,
)
from agent.scrub.cuda.driver import CudaDriver
from agent.scrub.cuda.passes import check_patterns, verify, verify_blocks, write


@dataclass(frozen=True)
class MemorySurvey:
    allocated_bytes: int
    examined_bytes: int
    matching_words: int
    memory_total_bytes: int


def fill_free_memory(word: int) -> int:
    """Write ``word`` over all the memory device 0's driver will allocate, free it, return the
    bytes written: the traces a departing tenant leaves behind."""
    check_patterns((word,))
    driver = CudaDriver()
    with device_context(driver), event_timer(driver) as timer:
        free_bytes, total_bytes = driver.memory_info()
        with all_memory(driver, free_bytes, total_bytes) as chunks:
            write(driver, timer, chunks, word)
            return sum(chunk.size for chunk in chunks)


def survey_free_memory(word: int) -> MemorySurvey:
    """Read, without writing, all the memory device 0's driver will allocate and count the 32-bit
    words equal to ``word``."""
    check_patterns((word,))
    driver = CudaDriver()
    with device_context(driver) as device:
        blocks = verify_blocks(driver, device)
        with (
            loaded_kernels(driver) as kernels,
            device_buffer(driver, 3 * 8, "verify counters") as counters,
            event_timer(driver) as timer,
        ):
            free_bytes, total_bytes = driver.memory_info()
            with all_memory(driver, free_bytes, total_bytes) as chunks:
                count, _ = verify(driver, timer, kernels.verify, blocks, counters, chunks, word)
                return MemorySurvey(
                    allocated_bytes=sum(chunk.size for chunk in chunks),
                    examined_bytes=count.examined_words * 4,
                    matching_words=count.examined_words - count.mismatched_words,
                    memory_total_bytes=total_bytes,
                )
