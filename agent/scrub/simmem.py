"""Simulated device memory: one file per GPU, each partition owning the byte range of its slices.

A MIG instance at placement (start, size) owns bytes [start * slice, (start + size) * slice) of
its GPU's file; a whole GPU owns the file. Residue therefore behaves as on hardware: what a 3g
instance left in slices 0-3 is readable by a later 1g instance placed on slice 2 unless scrubbed.
The tenant-workload simulator and the scrubber use the same mapping.
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from agent.errors import ScrubError, ValidationError
from agent.runtime import failpoints
from agent.runtime.failpoints import Fault
from agent.scrub.model import PassResult, ScrubTarget

# nvml-sim GPUs have 8 memory slices (NVIDIA MIG user guide: A100/H100 memory slices).
MEMORY_SLICES = 8
_CHUNK = 4 << 20

# Test hook: reach only half of the range, as a scrubber that could not allocate everything would.


@dataclass(frozen=True)
class MemoryRange:
    path: Path
    offset: int
    length: int


def memory_file(memory_dir: Path, gpu_uuid: str) -> Path:
    return memory_dir / f"{gpu_uuid}.mem"


def ensure_memory_file(memory_dir: Path, gpu_uuid: str, slice_bytes: int) -> Path:
    """Create the GPU's memory file (sparse, zero) if it does not exist yet."""
    path = memory_file(memory_dir, gpu_uuid)
    size = MEMORY_SLICES * slice_bytes
    if not path.exists() or path.stat().st_size != size:
        memory_dir.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as handle:
            handle.truncate(size)
    return path


def partition_range(
    memory_dir: Path,
    gpu_uuid: str,
    slice_bytes: int,
    placement: tuple[int, int] | None,
) -> MemoryRange:
    """Byte range of a partition: a MIG placement (start, size) or the whole GPU (None)."""
    path = ensure_memory_file(memory_dir, gpu_uuid, slice_bytes)
    if placement is None:
        return MemoryRange(path, 0, MEMORY_SLICES * slice_bytes)
    start, size = placement
    if start < 0 or size <= 0 or start + size > MEMORY_SLICES:
        raise ValidationError(
            f"placement {start}:{size} is outside the GPU's {MEMORY_SLICES} slices"
        )
    return MemoryRange(path, start * slice_bytes, size * slice_bytes)


def fill(region: MemoryRange, pattern: bytes) -> None:
    """Fill the range with ``pattern`` repeated (what a tenant workload leaves behind)."""
    if not pattern:
        raise ValidationError("the pattern is empty")
    block = (pattern * (_CHUNK // len(pattern) + 1))[
        : max(_CHUNK - _CHUNK % len(pattern), len(pattern))
    ]
    fd = os.open(region.path, os.O_RDWR)
    try:
        written = 0
        while written < region.length:
            piece = block[: region.length - written]
            written += os.pwrite(fd, piece, region.offset + written)
    finally:
        os.close(fd)


def count_occurrences(region: MemoryRange, needle: bytes) -> int:
    """How often ``needle`` occurs in the range, reading every byte of it."""
    if not needle:
        raise ValidationError("the text to find is empty")
    with (
        region.path.open("rb") as handle,
        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view,
    ):
        return view[region.offset : region.offset + region.length].count(needle)


class SimMemoryScrubBackend:
    """Overwrite a partition's byte range with each pattern, then read it all back and compare."""

    name = "simmem"

    def __init__(self, memory_dir: str = "", slice_bytes: int = 0) -> None:
        self._memory_dir = memory_dir
        self._slice_bytes = slice_bytes

    def resolve(self, target: ScrubTarget) -> ScrubTarget:
        """The partition's byte range of its GPU's memory file (its MIG placement's slices)."""
        if target.memory_file or not self._memory_dir or self._slice_bytes <= 0:
            return target
        placement = None
        if target.placement_start is not None and target.placement_size:
            placement = (target.placement_start, target.placement_size)
        region = partition_range(
            Path(self._memory_dir), target.gpu_uuid, self._slice_bytes, placement
        )
        return replace(
            target, total_bytes=region.length, memory_file=str(region.path), offset=region.offset
        )

    def scrub(self, target: ScrubTarget, patterns: tuple[int, ...]) -> tuple[PassResult, ...]:
        if not target.memory_file:
            raise ScrubError(f"partition {target.partition_uuid}: no simulated memory file")
        try:
            return tuple(self._pass(target, pattern) for pattern in patterns)
        except OSError as error:
            raise ScrubError(f"partition {target.partition_uuid}: {error}") from error

    def _pass(self, target: ScrubTarget, pattern: int) -> PassResult:
        word = pattern.to_bytes(4, "little")
        block = word * (_CHUNK // 4)
        with Path(target.memory_file).open("r+b") as handle:
            fd = handle.fileno()
            if os.fstat(fd).st_size < target.offset + target.total_bytes:
                raise ScrubError(
                    f"partition {target.partition_uuid}: memory file is shorter than its range"
                )
            reach = target.total_bytes
            if failpoints.active(Fault.SCRUB_SHORT_COVERAGE):
                reach //= 2
            started = time.perf_counter()
            written = 0
            while written < reach:
                written += os.pwrite(fd, block[: reach - written], target.offset + written)
            # No fsync: the page cache is what every other process reads, and a killed worker
            # does not lose it; power loss is outside what the simulation models.
            wrote = time.perf_counter()
            if failpoints.active(Fault.SCRUB_CORRUPT_AFTER_WRITE):
                # Test hook: a fault between write and verify, which the verify must catch.
                os.pwrite(fd, b"\x01", target.offset + reach // 2)
            verified = mismatched = 0
            while verified < reach:
                chunk = os.pread(fd, min(_CHUNK, reach - verified), target.offset + verified)
                if not chunk:
                    break
                if chunk != block[: len(chunk)]:
                    mismatched += sum(1 for a, b in zip(chunk, block, strict=False) if a != b)
                verified += len(chunk)
            done = time.perf_counter()
        return PassResult(
            pattern=pattern,
            bytes_written=written,
            bytes_verified=verified,
            write_seconds=wrote - started,
            verify_seconds=done - wrote,
            mismatched_bytes=mismatched,
        )
