"""The scrub's write and verify bandwidth against a baseline measured on the same memory, in the
same run (``accelguard bench scrub`` on a GPU node).

The baseline is a device-to-device copy (``cuMemcpyDtoD``), not ``cuMemsetD32``: the scrub's write
*is* ``cuMemsetD32``, so a ratio against it would be 1 by construction. The copy runs over the same
chunks, each chunk's first half onto its second half, so like the verify (which reads every byte
once) it touches every byte once. Its rate counts bytes read plus bytes written, as NVIDIA's
``bandwidthTest`` counts a device-to-device copy: DRAM traffic per second, the unit of the
verify's bytes read per second and of the write's bytes written per second. A copy mixes reads
and writes, which costs DRAM bus turnarounds, so a pure read stream can beat it: a ratio above 1
is possible and is no error. The result names the baseline of every ratio it reports.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any, Final

from agent.errors import ScrubError
from agent.scrub.cuda.chunks import Chunk
from agent.scrub.cuda.device import (
    Timer,
    all_memory,
    device_buffer,
    device_context,
    event_timer,
    loaded_kernels,
)
from agent.scrub.cuda.driver import CudaDriver
from agent.scrub.cuda.kernels import VERIFY_KERNEL
from agent.scrub.cuda.passes import verify, verify_blocks, write

#: How each rate of the result is measured; every ratio names one of them as its baseline.
MEASURED_WITH: Final = {
    "copy_bytes_per_s": {
        "operation": "cuMemcpyDtoD",
        "over": "each chunk's first half onto its second half",
        "counts": "bytes read + bytes written",
    },
    "scrub_write_bytes_per_s": {
        "operation": "cuMemsetD32",
        "over": "every chunk (the scrub's write)",
        "counts": "bytes written",
    },
    "scrub_verify_bytes_per_s": {
        "operation": VERIFY_KERNEL,
        "over": "every chunk (the scrub's verify)",
        "counts": "bytes read",
    },
}
RATIO_BASELINES: Final = {
    "write_ratio": "copy_bytes_per_s",
    "verify_ratio": "copy_bytes_per_s",
}


def half_copies(chunks: Sequence[Chunk]) -> list[tuple[int, int, int]]:
    """(destination, source, bytes) for each chunk: its first half onto its second half.

    Chunks are multiples of the allocation floor (2 MiB), so the halves are equal and aligned,
    and the copies together read or write every byte of the chunks exactly once."""
    copies = []
    for chunk in chunks:
        if chunk.size % 8:
            raise ScrubError(f"chunk of {chunk.size} B does not split into two aligned halves")
        half = chunk.size // 2
        copies.append((chunk.handle + half, chunk.handle, half))
    return copies


def _copy(driver: CudaDriver, timer: Timer, copies: Sequence[tuple[int, int, int]]) -> float:
    timer.start()
    for destination, source, size in copies:
        driver.copy_device_to_device(destination, source, size)
    return timer.stop()


def _rate(size: int, samples: Sequence[float]) -> float:
    return size / max(statistics.median(samples), 1e-9)


def summarise(
    scrubbed_bytes: int,
    copy_traffic_bytes: int,
    copy_seconds: Sequence[float],
    write_seconds: Sequence[float],
    verify_seconds: Sequence[float],
) -> dict[str, Any]:
    """Median rates and the ratios, each ratio with the name of its baseline."""
    rates = {
        "copy_bytes_per_s": _rate(copy_traffic_bytes, copy_seconds),
        "scrub_write_bytes_per_s": _rate(scrubbed_bytes, write_seconds),
        "scrub_verify_bytes_per_s": _rate(scrubbed_bytes, verify_seconds),
    }
    return {
        **rates,
        "write_ratio": rates["scrub_write_bytes_per_s"] / rates[RATIO_BASELINES["write_ratio"]],
        "verify_ratio": rates["scrub_verify_bytes_per_s"] / rates[RATIO_BASELINES["verify_ratio"]],
        "ratio_baselines": dict(RATIO_BASELINES),
        "measured_with": {rate: dict(how) for rate, how in MEASURED_WITH.items()},
    }


def benchmark_cuda(size_limit: int | None = None, rounds: int = 3) -> dict[str, Any]:
    """Copy baseline, scrub write and scrub verify bytes/s on the same allocation of device 0.

    ``size_limit`` caps the allocation (default: all the memory the driver gives). Each round
    runs the copy, the write and the verify back to back, so all three see the same clocks; the
    medians over ``rounds`` and the ratios to the copy are the result.
    """
    if rounds < 1:
        raise ScrubError(f"benchmark rounds must be at least 1 (got {rounds})")
    driver = CudaDriver()
    with device_context(driver) as device:
        blocks = verify_blocks(driver, device)
        with (
            loaded_kernels(driver) as kernels,
            device_buffer(driver, 3 * 8, "verify counters") as counters,
            event_timer(driver) as timer,
        ):
            free_bytes, total_bytes = driver.memory_info()
            with all_memory(driver, free_bytes, total_bytes, size_limit) as chunks:
                if not chunks:
                    raise ScrubError(f"no device memory could be allocated ({free_bytes} B free)")
                size = sum(chunk.size for chunk in chunks)
                copies = half_copies(chunks)
                # Warm-up: the first memset, copy and launch pay for page mapping and the PTX JIT.
                write(driver, timer, chunks, 0)
                verify(driver, timer, kernels.verify, blocks, counters, chunks, 0)
                _copy(driver, timer, copies)
                copy_seconds, write_seconds, verify_seconds = [], [], []
                for _ in range(rounds):
                    copy_seconds.append(_copy(driver, timer, copies))
                    write_seconds.append(write(driver, timer, chunks, 0))
                    verified, seconds = verify(
                        driver, timer, kernels.verify, blocks, counters, chunks, 0
                    )
                    if verified.examined_words * 4 != size or verified.mismatched_words:
                        raise ScrubError(
                            f"benchmark verify examined {verified.examined_words * 4} of {size} B "
                            f"and found {verified.mismatched_words} mismatched words"
                        )
                    verify_seconds.append(seconds)
                return {
                    "device": driver.device_name(device),
                    "driver_version": driver.driver_version(),
                    "bytes": size,
                    "chunks": len(chunks),
                    "memory_total_bytes": total_bytes,
                    "rounds": rounds,
                    **summarise(
                        size,
                        sum(2 * copied for _, _, copied in copies),
                        copy_seconds,
                        write_seconds,
                        verify_seconds,
                    ),
                }
