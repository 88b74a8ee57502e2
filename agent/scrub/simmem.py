"""Simulated device memory: one file per device, each partition owning the bytes of its units.

A device's memory is a sequence of equal units of ``slice_bytes``: a GPU's 8 MIG memory slices,
an NPU's units (one per AI Core, docs/dcmi-sim.md). A MIG instance at placement (start, size)
owns bytes [start * slice, (start + size) * slice) of its GPU's file; a vNPU owns the units of
its mask (adjacent ones merged into one range); a whole device owns the file. Residue therefore
behaves as on hardware: what a 3g instance left in slices 0-3 is readable by a later 1g instance
placed on slice 2 unless scrubbed. The tenant-workload simulator and the scrubber use the same
mapping.
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


@dataclass(frozen=True)
class MemoryRegion:
    """A partition's memory: one range, or several for a vNPU whose units are not adjacent."""

    ranges: tuple[MemoryRange, ...]

    @property
    def length(self) -> int:
        return sum(r.length for r in self.ranges)


def memory_file(memory_dir: Path, gpu_uuid: str) -> Path:
    return memory_dir / f"{gpu_uuid}.mem"


def ensure_memory_file(
    memory_dir: Path, gpu_uuid: str, slice_bytes: int, units: int = MEMORY_SLICES
) -> Path:
    """Create the device's memory file (sparse, zero) if it does not exist yet."""
    path = memory_file(memory_dir, gpu_uuid)
    size = units * slice_bytes
    if not path.exists() or path.stat().st_size != size:
        memory_dir.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as handle:
            handle.truncate(size)
    return path


def unit_runs(units: tuple[int, ...]) -> list[tuple[int, int]]:
    """(first unit, count) of each run of adjacent units, in order."""
    runs: list[tuple[int, int]] = []
    for unit in sorted(set(units)):
        if runs and runs[-1][0] + runs[-1][1] == unit:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((unit, 1))
    return runs


def partition_region(
    memory_dir: Path,
    device_uuid: str,
    slice_bytes: int,
    units: tuple[int, ...] | None,
    unit_total: int = MEMORY_SLICES,
) -> MemoryRegion:
    """The bytes of a partition: its units (a MIG placement's slices, a vNPU's units) or, for
    None, the whole device."""
    if unit_total <= 0:
        raise ValidationError(f"device {device_uuid} has no memory units")
    path = ensure_memory_file(memory_dir, device_uuid, slice_bytes, unit_total)
    if units is None:
        return MemoryRegion((MemoryRange(path, 0, unit_total * slice_bytes),))
    if not units or min(units) < 0 or max(units) >= unit_total:
        raise ValidationError(
            f"memory units {sorted(units)} are outside the device's {unit_total} units"
        )
    return MemoryRegion(
        tuple(
            MemoryRange(path, start * slice_bytes, count * slice_bytes)
            for start, count in unit_runs(units)
        )
    )


def fill(region: MemoryRegion, pattern: bytes) -> None:
    """Fill every range of the region with ``pattern`` repeated."""
    for piece in region.ranges:
        _fill_range(piece, pattern)


def count_occurrences(region: MemoryRegion, needle: bytes) -> int:
    """How often ``needle`` occurs in the region, reading every byte of it."""
    return sum(_count_in_range(piece, needle) for piece in region.ranges)


def _fill_range(region: MemoryRange, pattern: bytes) -> None:
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


def _count_in_range(region: MemoryRange, needle: bytes) -> int:
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
        """The partition's bytes of its device's memory file (its MIG placement's slices, its
        vNPU's units, or all of it)."""
        if target.memory_file or not self._memory_dir or self._slice_bytes <= 0:
            return target
        units: tuple[int, ...] | None = None
        if target.units:
            units = tuple(target.units)
        elif target.placement_start is not None and target.placement_size:
            units = tuple(
                range(target.placement_start, target.placement_start + target.placement_size)
            )
        region = partition_region(
            Path(self._memory_dir), target.gpu_uuid, self._slice_bytes, units,
            target.unit_total or MEMORY_SLICES,
        )  # fmt: skip
        return replace(
            target, total_bytes=region.length, memory_file=str(region.ranges[0].path),
            ranges=tuple((r.offset, r.length) for r in region.ranges),
        )  # fmt: skip

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
        ranges = [tuple(r) for r in target.ranges]
        if not ranges:
            raise ScrubError(f"partition {target.partition_uuid}: no byte ranges to scrub")
        with Path(target.memory_file).open("r+b") as handle:
            fd = handle.fileno()
            end = max(offset + length for offset, length in ranges)
            if os.fstat(fd).st_size < end:
                raise ScrubError(
                    f"partition {target.partition_uuid}: memory file is shorter than its range"
                )
            budget = target.total_bytes
            if failpoints.active(Fault.SCRUB_SHORT_COVERAGE):
                budget //= 2
            # (offset, bytes) this pass reaches: every range, or the first half of the bytes.
            reach: list[tuple[int, int]] = []
            for offset, length in ranges:
                if budget <= 0:
                    break
                reach.append((offset, min(length, budget)))
                budget -= length
            started = time.perf_counter()
            written = 0
            for offset, length in reach:
                done_here = 0
                while done_here < length:
                    done_here += os.pwrite(fd, block[: length - done_here], offset + done_here)
                written += done_here
            # No fsync: the page cache is what every other process reads, and a killed worker
            # does not lose it; power loss is outside what the simulation models.
            wrote = time.perf_counter()
            if failpoints.active(Fault.SCRUB_CORRUPT_AFTER_WRITE):
                # Test hook: a fault between write and verify, which the verify must catch.
                offset, length = reach[len(reach) // 2]
                os.pwrite(fd, b"\x01", offset + length // 2)
            verified = mismatched = 0
            for offset, length in reach:
                checked = 0
                while checked < length:
                    chunk = os.pread(fd, min(_CHUNK, length - checked), offset + checked)
                    if not chunk:
                        break
                    if chunk != block[: len(chunk)]:
                        mismatched += sum(1 for a, b in zip(chunk, block, strict=False) if a != b)
                    checked += len(chunk)
                verified += checked
            done = time.perf_counter()
        return PassResult(
            pattern=pattern,
            bytes_written=written,
            bytes_verified=verified,
            write_seconds=wrote - started,
            verify_seconds=done - wrote,
            mismatched_bytes=mismatched,
        )
