"""The benchmarks run and print one JSON document with a same-run baseline (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from tests.support import run_cli


@pytest.mark.parametrize(
    ("verb", "rounds", "ratios"),
    [
        ("layout", "2", ["ratio_p50"]),
        ("scrub", "1", ["ratio_write", "ratio_verify"]),
        ("lease", "3", ["ratio_grant_p50", "ratio_release_p50"]),
    ],
)
def test_bench_prints_ratios(verb: str, rounds: str, ratios: list[str]) -> None:
    result = run_cli("bench", verb, "--rounds", rounds, timeout=300)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["benchmark"] == verb
    for key in ratios:
        assert isinstance(document[key], float) and document[key] > 0


def test_bench_rejects_zero_rounds() -> None:
    result = run_cli("bench", "layout", "--rounds", "0")
    assert result.returncode == 2
    assert "--rounds" in result.stderr


def test_bench_lease_reports_the_busy_node_beside_the_quiet_one() -> None:
    result = run_cli("bench", "lease", "--rounds", "1", timeout=300)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["busy_node_descriptors"] >= 200_000
    assert document["busy_node_holder_processes"] >= 1
    for summary in ("release_to_clean", "release_to_clean_busy_node", "ping_during_busy_release"):
        for key in ("p50_ms", "p99_ms"):
            assert isinstance(document[summary][key], float) and document[summary][key] > 0
    for key in ("scan_overhead_p50_ms", "ratio_release_busy_p50", "ratio_ping_busy_p99"):
        # The overhead is a difference of two noisy medians: a number, of either sign.
        assert isinstance(document[key], float)


def test_bench_audit_measures_the_same_calls_with_auditing_off() -> None:
    result = run_cli("bench", "audit", "--rounds", "3", timeout=300)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    for side in ("audited", "baseline_not_audited"):
        for call in ("grant", "release"):
            assert document[side][call]["p50_ms"] > 0
    assert set(document["added_p50_ms"]) == {"grant", "release"}
    # The audited agent wrote its records (start, layout, each grant's and release's), and the
    # aim is stated with whether it held.
    assert document["records_per_round"] >= 8
    assert isinstance(document["aims_met"]["grant_added_p50"], bool)
