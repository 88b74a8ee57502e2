"""`accelguard bench attest`: the JSON shape and positive ratios (no timing is asserted)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent.attest.logs.eventlog import parse_event_log
from agent.attest.logs.ima import parse_ima_binary
from agent.bench.attest import synthetic_event_log, synthetic_ima_list
from agent.cli.bench import add_bench_attest, run_bench_attest
from tests.attest_e2e.helpers import BOOT_LOG, TESTDATA, run_cli

SMALL = [
    "--rounds", "1", "--ima-entries", "500", "--event-log-kib", "16", "--quotes", "3",
    "--evidence-intervals", "3",
]  # fmt: skip


def check_shape(result: dict[str, Any]) -> None:
    assert result["benchmark"] == "attest"
    for section, baseline_key in (
        ("event_log", "seconds_per_mb"),
        ("ima", "seconds_per_100k_entries"),
        ("quote_verify", "hashes_per_s"),
    ):
        part = result[section]
        assert isinstance(part["ratio"], int | float) and part["ratio"] > 0
        baseline = part["baseline_hashlib_sha256"][baseline_key]
        assert isinstance(baseline, int | float) and baseline > 0
    assert result["event_log"]["seconds_per_mb"] > 0
    assert result["ima"]["seconds_per_100k_entries"] > 0
    assert result["ima"]["median_seconds"] > 0
    assert result["ima"]["aim_seconds_per_100k_entries"] == 0.3
    assert result["quote_verify"]["verifications_per_s"] > 0
    evidence = result["evidence"]
    assert evidence["intervals"] == 3 and evidence["new_ima_entries"] == 100
    assert set(evidence["verification"]) == {"p50_ms", "p90_ms", "p99_ms", "mean_ms"}
    assert 0 < evidence["verification"]["p50_ms"] <= evidence["verification"]["p99_ms"]
    assert evidence["baseline_raw_ecdsa_verify_ms"] > 0
    assert evidence["ratio_p50_to_raw_ecdsa"] > 0
    assert evidence["aim_p50_ms"] == 1.0
    # Whether the aims held depends on the machine; that they are stated does not.
    assert set(result["aims_met"]) == {"ima_100k_entries", "evidence_p50"}
    assert all(isinstance(met, bool) for met in result["aims_met"].values())


def test_bench_in_process() -> None:
    parser = argparse.ArgumentParser()
    add_bench_attest(parser.add_subparsers(dest="verb"))
    check_shape(run_bench_attest(parser.parse_args(["attest", *SMALL])))


def test_bench_through_the_cli() -> None:
    result = run_cli("bench", "attest", *SMALL)
    assert result.returncode == 0, result.stderr
    check_shape(json.loads(result.stdout))
    refused = run_cli("bench", "attest", "--rounds", "0")
    assert refused.returncode == 2
    assert refused.stderr.strip() == "accelguard: error: --rounds must be at least 1"
    refused = run_cli("bench", "attest", "--evidence-intervals", "0")
    assert refused.returncode == 2
    assert refused.stderr.strip() == "accelguard: error: --evidence-intervals must be at least 1"


def test_bench_with_a_real_event_log() -> None:
    real = TESTDATA / BOOT_LOG
    result = run_cli("bench", "attest", *SMALL, "--evidence-event-log", str(real))
    assert result.returncode == 0, result.stderr
    evidence = json.loads(result.stdout)["evidence"]
    assert evidence["event_log"] == "given file"
    assert evidence["event_log_bytes"] == real.stat().st_size
    assert (
        f"a {len(parse_event_log(real.read_bytes()).events)}-event firmware log"
        in (evidence["what"])
    )


def test_synthetic_inputs_are_what_they_claim() -> None:
    log = parse_event_log(synthetic_event_log(8192))
    assert log.format == "crypto-agile" and log.findings == ()
    assert set(log.replay()) == {"sha1", "sha256"}
    measurements = parse_ima_binary(synthetic_ima_list(50))  # template hashes verified
    assert len(measurements.entries) == 50 and measurements.pcrs == {10}
