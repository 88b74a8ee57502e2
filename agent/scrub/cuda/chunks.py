"""Allocating all of a device's memory in chunks, backing off when a size is not allocatable.

Independent of CUDA: ``allocate_all`` sees device memory only through ``ChunkAllocator``, so CI
tests it against a fragmented fake allocator (it has no GPU); ``device.DeviceAllocator`` is the
real one. Every chunk is a multiple of the floor, and nothing allocated is leaked on an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

from agent.errors import ScrubError

GIB: Final = 1 << 30
MIB: Final = 1 << 20

#: First allocation size. Large chunks keep the number of memsets and launches small.
FIRST_CHUNK_BYTES: Final = 2 * GIB
#: Smallest allocation tried. The driver hands out device memory in 2 MiB pages; when no 2 MiB
#: allocation succeeds, what remains free is partly used pages that smaller requests would share.
CHUNK_FLOOR_BYTES: Final = 2 * MIB


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
