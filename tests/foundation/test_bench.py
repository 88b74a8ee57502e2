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
