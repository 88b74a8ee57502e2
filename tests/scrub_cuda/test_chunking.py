"""``allocate_all`` against a fake device allocator (CI has no GPU; this is the one place a fake
is right: the chunking logic is pure and the fake implements the same interface as cuMemAlloc).

The fake models device memory as free extents (fragments) with first-fit placement, and refuses
a request no single extent can hold, as cuMemAlloc returns CUDA_ERROR_OUT_OF_MEMORY when free
memory exists but not contiguously.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ScrubError
from agent.scrub.cuda.chunks import (
    CHUNK_FLOOR_BYTES,
    FIRST_CHUNK_BYTES,
    GIB,
    MIB,
    Chunk,
    allocate_all,
    release_all,
)


@dataclass
class FragmentedMemory:
    extents: list[int]
    # Fail (raise) on this allocation attempt, counting from 1: a driver error mid-way.
    fail_on_attempt: int | None = None
    attempts: list[int] = field(default_factory=list)
    live: dict[int, tuple[int, int]] = field(default_factory=dict)
    freed: list[int] = field(default_factory=list)
    _handles: itertools.count[int] = field(
        default_factory=lambda: itertools.count(0x7F0000000000, 4096)
    )

    def allocate(self, size: int) -> int | None:
        self.attempts.append(size)
        if self.fail_on_attempt is not None and len(self.attempts) == self.fail_on_attempt:
            raise ScrubError("cuMemAlloc_v2 failed: CUDA_ERROR_ECC_UNCORRECTABLE (214)")
        for index, free in enumerate(self.extents):
            if free >= size:
                self.extents[index] -= size
                handle = next(self._handles)
                self.live[handle] = (index, size)
                return handle
        return None

    def free(self, handle: int) -> None:
        if handle not in self.live:
            raise AssertionError(f"double or unknown free of {handle:#x}")
        index, size = self.live.pop(handle)
        self.extents[index] += size
        self.freed.append(handle)


class EndlessMemory:
    """Never runs out: allocate_all must still stop (at its limit)."""

    def __init__(self) -> None:
        self.live: set[int] = set()
        self._next = 0

    def allocate(self, size: int) -> int | None:
        assert size > 0
        self._next += 1
        self.live.add(self._next)
        return self._next

    def free(self, handle: int) -> None:
        self.live.remove(handle)


def total(chunks: list[Chunk]) -> int:
    return sum(chunk.size for chunk in chunks)


def test_whole_device_in_large_chunks() -> None:
    free = 79 * GIB + 300 * MIB
    memory = FragmentedMemory([free])
    chunks = allocate_all(memory, 80 * GIB)
    assert total(chunks) == free
    assert [c.size for c in chunks[:39]] == [FIRST_CHUNK_BYTES] * 39
    assert all(c.size % CHUNK_FLOOR_BYTES == 0 for c in chunks)
    assert sorted((c.size for c in chunks), reverse=True) == [c.size for c in chunks]
    assert memory.extents == [0]


def test_fragments_between_large_chunks_are_taken() -> None:
    extents = [3 * GIB, 6 * MIB, 2 * MIB, 1 * GIB + 10 * MIB, 4 * MIB]
    memory = FragmentedMemory(list(extents))
    chunks = allocate_all(memory, 10 * GIB)
    assert total(chunks) == sum(extents)
    assert memory.extents == [0] * len(extents)


def test_remainders_below_the_floor_are_left() -> None:
    memory = FragmentedMemory([5 * MIB, 1 * MIB, 3 * MIB])
    chunks = allocate_all(memory, 1 * GIB)
    assert total(chunks) == 4 * MIB + 2 * MIB
    assert memory.extents == [1 * MIB, 1 * MIB, 1 * MIB]


def test_backs_off_to_the_floor_then_stops() -> None:
    memory = FragmentedMemory([1 * MIB])
    assert allocate_all(memory, 80 * GIB) == []
    # 2 GiB, 1 GiB, ..., 2 MiB: one attempt per halving, then it gives up.
    assert memory.attempts == [FIRST_CHUNK_BYTES >> i for i in range(11)]
    assert memory.attempts[-1] == CHUNK_FLOOR_BYTES


def test_no_memory_at_all() -> None:
    memory = FragmentedMemory([])
    assert allocate_all(memory, 80 * GIB, first_chunk=64 * MIB) == []
    assert len(memory.attempts) == 6


def test_endless_memory_stops_at_the_limit() -> None:
    memory = EndlessMemory()
    chunks = allocate_all(memory, 5 * GIB + 7 * MIB)
    assert total(chunks) == 5 * GIB + 6 * MIB
    assert [c.size for c in chunks] == [2 * GIB, 2 * GIB, 1 * GIB + 6 * MIB]
    release_all(memory, chunks)
    assert memory.live == set()
    assert chunks == []


def test_limit_of_zero_allocates_nothing() -> None:
    memory = EndlessMemory()
    assert allocate_all(memory, 0) == []
    assert memory.live == set()


def test_first_chunk_is_rounded_to_the_floor() -> None:
    memory = FragmentedMemory([100 * MIB])
    chunks = allocate_all(memory, 100 * MIB, first_chunk=33 * MIB)
    assert [c.size for c in chunks][:3] == [32 * MIB] * 3
    assert total(chunks) == 100 * MIB


def test_driver_error_mid_way_frees_everything() -> None:
    memory = FragmentedMemory([10 * GIB], fail_on_attempt=4)
    with pytest.raises(ScrubError, match="ECC_UNCORRECTABLE"):
        allocate_all(memory, 80 * GIB)
    assert memory.live == {}
    assert len(memory.freed) == 3
    assert memory.extents == [10 * GIB]


def test_release_all_keeps_freeing_after_a_failure() -> None:
    memory = FragmentedMemory([1 * GIB])
    chunks = allocate_all(memory, 1 * GIB, first_chunk=256 * MIB)
    assert len(chunks) == 4
    chunks.insert(2, Chunk(handle=0xBAD, size=2 * MIB))
    with pytest.raises(AssertionError, match="unknown free of 0xbad"):
        release_all(memory, chunks)
    assert memory.live == {}
    assert chunks == []


@pytest.mark.parametrize(
    ("limit", "first_chunk", "floor", "reason"),
    [
        (1 * GIB, 1 * GIB, 0, "positive multiple of 4"),
        (1 * GIB, 1 * GIB, 6, "positive multiple of 4"),
        (1 * GIB, 1 * MIB, 2 * MIB, "smaller than the floor"),
        (-1, 1 * GIB, 2 * MIB, "must not be negative"),
    ],
)
def test_invalid_parameters(limit: int, first_chunk: int, floor: int, reason: str) -> None:
    with pytest.raises(ScrubError, match=reason):
        allocate_all(EndlessMemory(), limit, first_chunk=first_chunk, floor=floor)


FLOOR = 4096  # small units keep the hypothesis cases fast; the logic is scale-free


@settings(max_examples=3000, deadline=None)
@given(
    extents=st.lists(st.integers(min_value=0, max_value=300 * FLOOR), max_size=12),
    first_chunk_units=st.sampled_from([1, 2, 4, 16, 64, 1024]) | st.integers(1, 100),
    limit=st.integers(min_value=0, max_value=5000 * FLOOR),
)
def test_properties_over_arbitrary_fragmentation(
    extents: list[int], first_chunk_units: int, limit: int
) -> None:
    memory = FragmentedMemory(list(extents))
    first_chunk = first_chunk_units * FLOOR
    chunks = allocate_all(memory, limit, first_chunk=first_chunk, floor=FLOOR)
    covered = total(chunks)
    assert covered <= limit
    assert all(c.size % FLOOR == 0 and FLOOR <= c.size <= first_chunk for c in chunks)
    # Terminates quickly: every attempt either succeeds or shrinks the request.
    halvings = first_chunk_units.bit_length() + 1
    assert len(memory.attempts) <= len(chunks) + halvings
    # Sizes never grow back after an out-of-memory.
    assert memory.attempts == sorted(memory.attempts, reverse=True)
    takeable = sum(extent - extent % FLOOR for extent in extents)
    if first_chunk_units & (first_chunk_units - 1) == 0:
        # Power-of-two steps down to the floor leave less than one floor in each fragment.
        assert covered == min(takeable, limit - limit % FLOOR)
    else:
        assert covered >= min(takeable, limit - limit % FLOOR) - len(extents) * first_chunk
    release_all(memory, chunks)
    assert memory.live == {}
    assert memory.extents == extents
