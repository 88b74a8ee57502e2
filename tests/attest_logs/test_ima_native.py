"""The native fast path of binary IMA lists (native/imafast, agent/attest/logs/ima_native.py)
against the Python parser and replay, which stay the reference.

Every comparison parses the same bytes twice, with the library and with it switched off, and
requires the same outcome: the same entries, PCR values in every bank (whole list, tail,
legacy padding, traces) and template-hash mismatches, or the same ImaLogError message. The
library is part of the build (`make test` builds it), so its absence fails here, not skips.
"""

from __future__ import annotations

import ctypes.util
import hashlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.attest.logs import ima_native
from agent.attest.logs.ima import ImaLog, parse_ima_binary
from agent.attest.logs.ima_native import NativeImaLog
from agent.bench.attest import _bench_ima
from agent.errors import ImaLogError
from tests.attest_logs.test_ima import (
    Measurement,
    comparable,
    ima_ng,
    measurements,
    sample_measurements,
)
from tests.attest_logs.test_ima_variants import binary_list, variants
from tests.fuzzing import MUTATIONS, fuzz, mutate, random_mutations
from tests.support import REPO

NATIVE_BANKS = ["sha1", "sha256", "sha384", "sha512"]
# The banks replayed in each comparison: the native ones and one only Python hashes.
REPLAY_BANKS = [*NATIVE_BANKS, "sha3_256"]
BUILT = binary_list((sample_measurements() + variants()) * 2)


@contextmanager
def python_only() -> Iterator[None]:
    previous = ima_native.use_native(False)
    try:
        yield
    finally:
        ima_native.use_native(previous)


def attempt(call: Callable[[], object]) -> object:
    try:
        return call()
    except ImaLogError as error:
        return ("ImaLogError", str(error))


def observed(log: ImaLog) -> dict[str, object]:
    """Everything a caller can learn from a parsed list, errors included."""
    first, end = log.first_index, log.first_index + len(log)
    middle = first + len(log) // 2
    result: dict[str, object] = {
        "length": len(log),
        "violations": log.violations,
        "pcrs": log.pcrs,
        "banks": log.replayable_banks(),
        "mismatches": [
            (entry.index, computed) for entry, computed in log.template_hash_mismatches()
        ],
    }
    for bank in REPLAY_BANKS:
        for pcr in sorted(log.pcrs | {10, 11}):
            for legacy in (False, True):
                result[f"{bank}/{pcr}/{legacy}"] = attempt(
                    lambda: log.replay(bank, pcr=pcr, legacy_padded_sha1=legacy)  # noqa: B023
                )
    size = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
    for bank in ("sha1", "sha256"):
        for start in (first - 1, first, middle, end, end + 1):
            for starting in (None, b"\x5a" * size[bank], b"\x5a" * 7):
                result[f"{bank}/from {start}/{starting!r}"] = attempt(
                    lambda: log.replay_trace(bank, start_index=start, starting_pcr=starting)  # noqa: B023
                )
    result["trace384"] = attempt(lambda: log.replay_trace("sha384", pcr=10, start_index=middle))
    result["entries"] = [(comparable(entry), entry.offset) for entry in log.entries]
    result["dict"] = json.dumps(log.to_dict())
    return result


def both(data: bytes, **options: object) -> tuple[object, object, bool]:
    """(native outcome, Python outcome, whether the library took the list)."""

    def outcome() -> tuple[object, ImaLog | None]:
        try:
            log = parse_ima_binary(data, **options)  # type: ignore[arg-type]
        except ImaLogError as error:
            return ("ImaLogError", str(error)), None
        return observed(log), log

    native, native_log = outcome()
    with python_only():
        python, python_log = outcome()
    assert not isinstance(python_log, NativeImaLog)
    if native_log is not None and python_log is not None:
        assert native_log == python_log
        assert python_log == native_log
        assert repr(native_log) == repr(python_log)
    return native, python, isinstance(native_log, NativeImaLog)


def assert_same(data: bytes, **options: object) -> bool:
    native, python, took = both(data, **options)
    assert native == python
    return took


# --- The library is there, and its absence only slows things down ---


def test_the_library_is_built_and_loads() -> None:
    path = ima_native.library_path()
    assert path.is_file(), (
        f"{path} is missing: build it with `make native` (or make -C native/imafast)"
    )
    assert ima_native.library() is not None, f"{path} does not load (see the debug log)"
    assert ima_native.active()
    assert isinstance(parse_ima_binary(BUILT), NativeImaLog)


_FALLBACK = """
import json, sys
from agent.attest.logs import ima_native
from agent.attest.logs.ima import parse_ima_binary
data = sys.stdin.buffer.read()
parse_ima_binary(data)
log = parse_ima_binary(data)
print(json.dumps({
    "active": ima_native.active(),
    "type": type(log).__name__,
    "sha1": log.replay("sha1").hex(),
    "sha256": log.replay("sha256").hex(),
    "trace": [[i, v.hex()] for i, v in log.replay_trace("sha256", pcr=11)],
}))
"""


@pytest.mark.parametrize("library", ["missing", "not a library", "no such symbol"])
def test_without_the_library_the_python_path_runs(tmp_path: Path, library: str) -> None:
    path = tmp_path / "libaccelguard-ima.so"
    if library == "not a library":
        path.write_bytes(b"\x7fELF but not really")
    elif library == "no such symbol":
        # A real shared library, without the accelguard_ima_* entry points.
        path = Path(ctypes.util.find_library("crypto") or "libcrypto.so.3")
    result = subprocess.run(
        [sys.executable, "-c", _FALLBACK],
        input=BUILT,
        capture_output=True,
        cwd=REPO,
        env={**os.environ, ima_native.LIBRARY_ENV: str(path)},
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    # structlog, unconfigured, prints to stdout: the lookup is logged once, the report follows.
    *logged, last = result.stdout.decode().splitlines()
    assert len([line for line in logged if "ima_native_unavailable" in line]) == 1, logged
    report = json.loads(last)
    log = parse_ima_binary(BUILT)
    assert isinstance(log, NativeImaLog)
    assert report == {
        "active": False,
        "type": "ImaLog",
        "sha1": log.replay("sha1").hex(),
        "sha256": log.replay("sha256").hex(),
        "trace": [[i, v.hex()] for i, v in log.replay_trace("sha256", pcr=11)],
    }


def test_switched_off_the_python_path_runs() -> None:
    with python_only():
        assert not ima_native.active()
        assert type(parse_ima_binary(BUILT)) is ImaLog
    assert isinstance(parse_ima_binary(BUILT), NativeImaLog)


# --- Deterministic cases: what the library takes, and what it leaves to Python ---


@pytest.mark.parametrize("listed", NATIVE_BANKS)
@pytest.mark.parametrize("verify", [True, False])
def test_every_template_and_bank_natively(listed: str, verify: bool) -> None:
    data = binary_list((sample_measurements() + variants()) * 3, listed)
    assert assert_same(data, template_hash_bank=listed, verify_template_hashes=verify)
    assert assert_same(data, template_hash_bank=listed, first_index=17)


@pytest.mark.parametrize("listed", ["sha3_256", "sha3_512"])
def test_banks_the_library_does_not_hash_parse_in_python(listed: str) -> None:
    size = hashlib.new(listed).digest_size
    data = b"".join(
        struct.pack("<I", m.pcr)
        + (bytes(size) if m.violation else hashlib.new(listed, m.hash_input()).digest())
        + m.binary()[24:]
        for m in sample_measurements() + variants()
    )
    assert not assert_same(data, template_hash_bank=listed)


def test_a_template_hash_mismatch_is_worded_by_python() -> None:
    log = parse_ima_binary(BUILT)
    # The last byte of entry 3's data (its signature).
    tampered = bytearray(BUILT)
    tampered[log.entries[4].offset - 1] ^= 1
    native, python, took = both(bytes(tampered))
    assert not took
    assert native == python
    assert isinstance(native, tuple)
    assert native[1].startswith("entry 3: template hash mismatch")
    # Unchecked, the library takes it and reports the mismatch like the Python check.
    assert assert_same(bytes(tampered), verify_template_hashes=False)
    unchecked = parse_ima_binary(bytes(tampered), verify_template_hashes=False)
    assert isinstance(unchecked, NativeImaLog)
    assert [entry.index for entry, _ in unchecked.template_hash_mismatches()] == [3]


def test_a_field_count_the_template_refuses_is_worded_by_python() -> None:
    extra = Measurement("ima-ng", (*ima_ng(b"/x").fields, b"extra"))
    native, python, took = both(binary_list([ima_ng(b"/a"), extra]))
    assert not took
    assert (
        native
        == python
        == ("ImaLogError", "entry 1: template ima-ng has 2 fields, the entry has 3")
    )


def test_unknown_templates_with_varying_field_counts() -> None:
    items = [Measurement("my-template", (b"one",)), Measurement("my-template", (b"a", b"b\x00"))]
    assert assert_same(binary_list(items))


def test_more_templates_than_the_library_makes_room_for() -> None:
    items = [Measurement(f"t{number}", (b"x%d" % number,)) for number in range(70)]
    assert not assert_same(binary_list(items))
    assert assert_same(binary_list(items[:60]))


def test_lengths_at_and_over_the_bounds() -> None:
    head = struct.pack("<I", 10) + bytes(20)
    big = b"\x00" * (1024 * 1024 - 4)
    at_bound = head + struct.pack("<I", 6) + b"ima-ng" + struct.pack("<I", len(big) + 4)
    at_bound += struct.pack("<I", len(big)) + big
    assert_same(at_bound)
    cases = [
        head + struct.pack("<I", 255) + b"a" * 255 + struct.pack("<I", 0),
        head + struct.pack("<I", 256) + b"a" * 256 + struct.pack("<I", 0),
        head + struct.pack("<I", 0) + struct.pack("<I", 0),
        head + struct.pack("<I", 3) + b"ima" + bytes(20) + struct.pack("<I", 255) + b"n" * 255,
        head + struct.pack("<I", 3) + b"ima" + bytes(20) + struct.pack("<I", 256) + b"n" * 256,
        struct.pack("<I", 24) + bytes(20) + struct.pack("<I", 1) + b"a" + struct.pack("<I", 0),
        struct.pack("<I", 23) + bytes(20) + struct.pack("<I", 1) + b"a" + struct.pack("<I", 0),
        head + struct.pack("<I", 1) + b"a" + struct.pack("<I", 64) + struct.pack("<I", 0) * 16,
        head + struct.pack("<I", 1) + b"a" + struct.pack("<I", 60) + struct.pack("<I", 0) * 15,
        head + struct.pack("<I", 0xFFFFFFFF),
        b"",
        head[:7],
    ]
    for data in cases:
        assert_same(data)


def test_incremental_replay_from_kept_values() -> None:
    items = (sample_measurements() + variants()) * 3
    full = binary_list(items)
    offsets = [entry.offset for entry in parse_ima_binary(full).entries] + [len(full)]
    for split in (0, 1, 7, len(items) - 1, len(items)):
        kept = parse_ima_binary(full[: offsets[split]]).replay("sha256")
        tail = full[offsets[split] :]
        assert assert_same(tail, first_index=split) or not tail
        whole = parse_ima_binary(full).replay("sha256")
        tail_log = parse_ima_binary(tail, first_index=split)
        assert tail_log.replay("sha256", starting_pcr=kept) == whole


# --- Fuzzing: the same outcome with and without the library ---


@fuzz(500)
@given(st.binary(max_size=2048), st.sampled_from(["sha1", "sha256"]), st.booleans())
def test_fuzz_arbitrary_bytes_same_outcome(data: bytes, listed: str, verify: bool) -> None:
    assert_same(data, template_hash_bank=listed, verify_template_hashes=verify)


@fuzz(500)
@given(MUTATIONS, st.sampled_from(NATIVE_BANKS), st.booleans())
def test_fuzz_mutated_lists_same_outcome(
    mutations: list[tuple[str, int, int]], listed: str, verify: bool
) -> None:
    data = binary_list((sample_measurements() + variants()) * 2, listed)
    assert_same(mutate(data, mutations), template_hash_bank=listed, verify_template_hashes=verify)


@fuzz(40)
@given(st.integers(0, 2**64))
def test_fuzz_mutated_lists_same_outcome_in_bulk(seed: int) -> None:
    for round_seed in range(seed, seed + 10):
        mutations = random_mutations(round_seed)
        try:
            assert_same(mutate(BUILT, mutations), verify_template_hashes=round_seed % 2 == 0)
        except AssertionError as error:
            error.add_note(f"mutations {mutations}")
            raise


@fuzz(300)
@given(st.binary(max_size=512), st.integers(0, len(BUILT)))
def test_fuzz_bytes_spliced_into_a_valid_list_same_outcome(chunk: bytes, where: int) -> None:
    assert_same(BUILT[:where] + chunk + BUILT[where:], verify_template_hashes=where % 2 == 0)


@fuzz(150)
@given(
    st.lists(measurements(), max_size=12),
    st.sampled_from(NATIVE_BANKS),
    st.integers(0, 5),
)
def test_fuzz_valid_lists_go_native_with_the_same_outcome(
    items: list[Measurement], listed: str, first_index: int
) -> None:
    took = assert_same(
        binary_list(items, listed), template_hash_bank=listed, first_index=first_index
    )
    assert took


def test_the_bench_measures_the_native_path() -> None:
    assert _bench_ima(1, 200)["native"] is True
