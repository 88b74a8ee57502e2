"""``CudaScrubBackend``: scrub a GPU or MIG partition through the CUDA driver API.

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

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.errors import ScrubError
from agent.scrub.cuda.chunks import Chunk
from agent.scrub.cuda.device import (
    Kernels,
    Timer,
    all_memory,
    device_buffer,
    device_context,
    event_timer,
    format_uuid,
    loaded_kernels,
)
from agent.scrub.cuda.driver import CudaDriver
from agent.scrub.cuda.passes import (
    SharedMemoryReport,
    check_patterns,
    clear_shared_memory,
    verify,
    verify_blocks,
    write,
)
from agent.scrub.model import PassResult, ScrubTarget


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


def _check_visible_device(target: ScrubTarget) -> None:
    """The worker's environment must name the partition, before CUDA is even initialised."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if visible != target.visible_device:
        raise ScrubError(
            f"CUDA_VISIBLE_DEVICES is {visible!r}, not the partition's {target.visible_device!r}: "
            "the scrub worker must be started with it set to the partition"
        )


@dataclass(frozen=True)
class _PassesOutcome:
    passes: tuple[PassResult, ...]
    first_mismatches: dict[int, tuple[int, int]]


def _run_passes(
    driver: CudaDriver,
    timer: Timer,
    kernels: Kernels,
    counters: int,
    chunks: Sequence[Chunk],
    patterns: tuple[int, ...],
    blocks: int,
) -> _PassesOutcome:
    written = sum(chunk.size for chunk in chunks)
    passes: list[PassResult] = []
    first_mismatches: dict[int, tuple[int, int]] = {}
    for pattern in patterns:
        write_seconds = write(driver, timer, chunks, pattern)
        count, verify_seconds = verify(
            driver, timer, kernels.verify, blocks, counters, chunks, pattern
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

    def resolve(self, target: ScrubTarget) -> ScrubTarget:
        return target  # the device itself says what memory there is

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
        check_patterns(patterns)
        _check_visible_device(target)
        self.last_report = None
        self._target_total_bytes = target.total_bytes
        driver = CudaDriver(self._library)
        with device_context(driver, target) as device:
            uuid = format_uuid(driver.device_uuid(device))
            blocks = verify_blocks(driver, device)
            with (
                loaded_kernels(driver) as kernels,
                device_buffer(driver, 3 * 8, "verify counters") as counters,
                event_timer(driver) as timer,
            ):
                shared = None
                if self._shared_memory:
                    shared = clear_shared_memory(driver, device, kernels.clear_shared)
                # Taken after every small allocation of ours: the rest is what gets scrubbed.
                free_bytes, total_bytes = driver.memory_info()
                with all_memory(driver, free_bytes, total_bytes) as chunks:
                    if not chunks:
                        raise ScrubError(
                            f"could not allocate any device memory on {uuid} ({free_bytes} B "
                            "reported free): is a process still using the partition?"
                        )
                    outcome = _run_passes(
                        driver, timer, kernels, counters, chunks, patterns, blocks
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
