"""Shared fuzzing helpers: example budgets and byte-level mutations of real inputs.

Example counts are sized for CI (several thousand per parser); ``ACCELGUARD_FUZZ_SCALE``
multiplies them for a long run (docs/attestation-logs.md).
"""

from __future__ import annotations

import os
import random
import struct

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FUZZ_SCALE = float(os.environ.get("ACCELGUARD_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=max(1, int(examples * FUZZ_SCALE)),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# One draw per mutation (kind, position, value) keeps Hypothesis' per-example cost low.
MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "truncate", "u32", "insert", "delete"]),
        st.integers(0, 2**20),
        st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, 3, 6, 20, 255, 256, 2**20 + 1, 2**31]),
    ),
    min_size=1,
    max_size=4,
)


def random_mutations(seed: int) -> list[tuple[str, int, int]]:
    """The same kind of mutations as MUTATIONS, from a seed: cheap enough for bulk runs."""
    rng = random.Random(seed)
    kinds = ["flip", "truncate", "u32", "insert", "delete"]
    values = [0, 1, 3, 6, 20, 255, 256, 2**20 + 1, 2**31, 2**32 - 1]
    return [
        (rng.choice(kinds), rng.randrange(2**20), rng.choice([*values, rng.randrange(2**32)]))
        for _ in range(rng.randint(1, 4))
    ]


def mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    """Bit flips, truncations, u32 overwrites (length-field inflation), inserts, deletes."""
    buffer = bytearray(data)
    for kind, where, value in mutations:
        position = where % max(len(buffer), 1)
        if kind == "flip" and buffer:
            buffer[position] ^= 1 << (value % 8)
        elif kind == "truncate":
            del buffer[position:]
        elif kind == "u32":
            buffer[position : position + 4] = struct.pack("<I", value)
        elif kind == "insert":
            buffer[position:position] = value.to_bytes(4, "little")[: 1 + value % 4]
        else:
            del buffer[position : position + 1 + value % 64]
    return bytes(buffer)
