"""The contract with the device code (``native/scrub/scrub.cu``): entry points, their parameters,
launch geometry, the counters' encoding, and where the PTX built from it is found.

tests/scrub_cuda/test_ptx.py checks the committed PTX declares exactly these entries, with these
parameter widths and this block size, so a change on one side that the other misses fails in CI.
"""

from __future__ import annotations

import ctypes
import importlib.resources
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from agent.errors import ScrubError
from agent.scrub.cuda.driver import CudaDriver

#: Entry points in scrub.ptx (tests/scrub_cuda/test_ptx.py checks the PTX declares them).
VERIFY_KERNEL: Final = "accelguard_scrub_verify"
SHARED_MEMORY_KERNEL: Final = "accelguard_clear_shared"
KERNEL_NAMES: Final = (VERIFY_KERNEL, SHARED_MEMORY_KERNEL)
#: Each kernel's parameters as scrub.cu declares them (pointers are 64-bit): the launch builds its
#: argument values from these types, and the PTX test checks the .entry declarations agree.
KERNEL_PARAMETERS: Final[dict[str, tuple[type[ctypes.c_uint32] | type[ctypes.c_uint64], ...]]] = {
    # words, word_count, pattern, chunk_tag, counters
    VERIFY_KERNEL: (
        ctypes.c_uint64,
        ctypes.c_uint64,
        ctypes.c_uint32,
        ctypes.c_uint64,
        ctypes.c_uint64,
    ),
    # shared_words, counters, sm_visits, sm_slots
    SHARED_MEMORY_KERNEL: (ctypes.c_uint32, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint32),
}
#: Both kernels are compiled with __launch_bounds__(256) (.maxntid 256 in the PTX).
BLOCK_THREADS: Final = 256

# 8 blocks of 256 threads is 2048 threads, the resident maximum of an sm_80/sm_90 SM; the verify
# kernel is a grid-stride loop, so more blocks would only queue.
VERIFY_BLOCKS_PER_SM: Final = 8
# scrub.cu: first mismatch = (chunk tag << 40) | word index, so tags and indices must fit.
_WORD_INDEX_BITS: Final = 40
MAX_CHUNK_TAG: Final = (1 << (64 - _WORD_INDEX_BITS)) - 1
_NO_MISMATCH: Final = (1 << 64) - 1
# %smid is below 1024 on every NVIDIA GPU so far (H100: 144 physical SMs); larger ids are not
# counted, which can only make the on-chip report say fewer SMs were reached.
SM_SLOTS: Final = 1024


def first_mismatch(encoded: int) -> tuple[int, int] | None:
    """(chunk tag, word index) from the verify kernel's first-mismatch counter, None if unset."""
    if encoded == _NO_MISMATCH:
        return None
    return encoded >> _WORD_INDEX_BITS, encoded & ((1 << _WORD_INDEX_BITS) - 1)


def scrub_ptx() -> bytes:
    """The verify kernels' PTX.

    Looked up first as package data (``agent/scrub/cuda/scrub.ptx``, for an installed wheel that
    includes ``native/scrub/scrub.ptx`` under that name), then in the repository checkout this
    module runs from (``native/scrub/scrub.ptx``).
    """
    packaged = importlib.resources.files("agent.scrub.cuda").joinpath("scrub.ptx")
    checkout = Path(__file__).resolve().parents[3] / "native" / "scrub" / "scrub.ptx"
    for candidate in (packaged, checkout):
        try:
            if candidate.is_file():
                return candidate.read_bytes()
        except OSError as error:
            raise ScrubError(f"cannot read the scrub kernels at {candidate}: {error}") from error
    raise ScrubError(
        f"scrub kernels not found: neither {packaged} nor {checkout} exists (build them with "
        "native/scrub/build.sh, or install a package that ships agent/scrub/cuda/scrub.ptx)"
    )


def launch(
    driver: CudaDriver,
    function: int,
    kernel: str,
    blocks: int,
    values: Sequence[int],
    shared_bytes: int = 0,
) -> None:
    """Launch ``function`` (the entry ``kernel`` of scrub.ptx), ``BLOCK_THREADS`` per block, with
    ``values`` converted to the parameter types scrub.cu declares."""
    types = KERNEL_PARAMETERS[kernel]
    if len(values) != len(types):
        raise ScrubError(f"{kernel} takes {len(types)} arguments, not {len(values)}")
    arguments = [kind(value) for kind, value in zip(types, values, strict=True)]
    driver.launch(
        function,
        blocks,
        BLOCK_THREADS,
        arguments,
        shared_bytes=shared_bytes,
        what=f"{kernel}, {blocks}x{BLOCK_THREADS} threads, {shared_bytes} B shared",
    )
