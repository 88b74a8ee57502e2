"""What `bench scrub` compares on a GPU, checked without one: the copy baseline's layout over the
chunks, that every ratio names a baseline that is not the operation it rates, and that every
driver symbol the CUDA modules call is declared (and so checked against cuda.h in test_ptx.py).
The measurement itself runs in hwtests/test_cuda_scrub.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import ScrubError
from agent.scrub.cuda.benchmark import MEASURED_WITH, RATIO_BASELINES, half_copies, summarise
from agent.scrub.cuda.chunks import CHUNK_FLOOR_BYTES, Chunk
from agent.scrub.cuda.driver import DRIVER_SIGNATURES

CUDA_PACKAGE = Path(__file__).resolve().parents[2] / "agent" / "scrub" / "cuda"


@given(
    st.lists(st.integers(min_value=1, max_value=64), max_size=20),
    st.integers(min_value=0, max_value=1 << 40),
)
def test_the_copy_reads_or_writes_every_byte_once(floors: list[int], base: int) -> None:
    chunks, handle = [], base * CHUNK_FLOOR_BYTES
    for count in floors:
        chunks.append(Chunk(handle, count * CHUNK_FLOOR_BYTES))
        handle += count * CHUNK_FLOOR_BYTES
    copies = half_copies(chunks)
    touched = sorted(
        [(source, source + size) for _, source, size in copies]
        + [(destination, destination + size) for destination, _, size in copies]
    )
    expected = sorted(
        [(c.handle, c.handle + c.size // 2) for c in chunks]
        + [(c.handle + c.size // 2, c.handle + c.size) for c in chunks]
    )
    assert touched == expected  # no overlap, nothing left out
    assert all(size % 4 == 0 and destination % 4 == 0 for destination, _, size in copies)
    assert sum(2 * size for _, _, size in copies) == sum(c.size for c in chunks)


def test_a_chunk_without_aligned_halves_is_refused() -> None:
    with pytest.raises(ScrubError, match="aligned halves"):
        half_copies([Chunk(0x1000, CHUNK_FLOOR_BYTES + 4)])


def test_every_ratio_names_a_baseline_that_is_not_what_it_rates() -> None:
    result = summarise(1000, 1000, [1.0, 2.0, 9.0], [4.0, 4.0, 4.0], [0.5, 8.0, 1.0])
    assert result["copy_bytes_per_s"] == 500.0
    assert result["scrub_write_bytes_per_s"] == 250.0
    assert result["scrub_verify_bytes_per_s"] == 1000.0
    assert result["ratio_baselines"] == RATIO_BASELINES
    assert result["measured_with"] == MEASURED_WITH
    for ratio, baseline in result["ratio_baselines"].items():
        rated = f"scrub_{ratio.removesuffix('_ratio')}_bytes_per_s"
        assert result[ratio] == result[rated] / result[baseline]
        # The write IS cuMemsetD32: against a memset baseline its ratio was 1 by construction.
        assert MEASURED_WITH[rated]["operation"] != MEASURED_WITH[baseline]["operation"], ratio
    assert result["write_ratio"] == 0.5
    assert result["verify_ratio"] == 2.0


def test_every_driver_symbol_called_is_declared() -> None:
    """A symbol missing from DRIVER_SIGNATURES would fail only on a GPU node, at its first call;
    a declared one is checked against cuda.h by test_ptx.py."""
    called = set()
    for module in CUDA_PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            # driver.call("cuX", ...), self._function("cuX"), self.has("cuX")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in {"call", "_function", "has"}
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                called.add(node.args[0].value)
    assert "cuMemcpyDtoD_v2" in called
    assert called <= set(DRIVER_SIGNATURES), called - set(DRIVER_SIGNATURES)
