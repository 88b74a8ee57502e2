"""``accelguard bench link --quick``: a real controller process and real TLS clients; the document
has every number it promises (values are not judged: no timing is asserted)."""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

import pytest

from agent.bench.link import AIM_NODES, QUICK_FAN_IN, _aim, add_bench_parser, run_bench

LATENCY = ("p50_ms", "p90_ms", "p99_ms", "mean_ms")


def _number(document: dict[str, Any], *path: str) -> float:
    value: Any = document
    for key in path:
        assert isinstance(value, dict) and key in value, f"missing {'.'.join(path)}"
        value = value[key]
    assert isinstance(value, int | float) and not isinstance(value, bool), (path, value)
    assert math.isfinite(value), (path, value)
    return float(value)


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="verb", required=True))
    return parser.parse_args(["link", *argv])


def test_quick_bench_reports_round_trip_and_fan_in_numbers() -> None:
    affinity = os.sched_getaffinity(0)
    result = run_bench(_parse("--quick"))
    assert os.sched_getaffinity(0) == affinity  # the bench pins itself only while it runs
    json.dumps(result)  # printable as it is
    assert result["benchmark"] == "link"
    assert result["quick"] is True

    trip = result["round_trip"]
    for section in ("report_round_trip", "enqueue", "baseline_unary"):
        for key in LATENCY:
            _number(trip, section, key)
    _number(trip, "ratio_p50")
    assert _number(trip, "rounds") >= 1

    steps = result["fan_in"]
    assert [step["nodes"] for step in steps] == sorted(QUICK_FAN_IN)
    for step in steps:
        for key in (
            "heartbeat_s", "window_s", "connect_new_s", "offered_reports_per_s", "reports_sent",
            "reports_acked", "reports_unacked", "reports_per_s", "ack_max_ms",
            "controller_cpu_percent", "controller_rss_bytes", "client_cpu_percent",
            "stream_errors",
        ):  # fmt: skip
            _number(step, key)
        for key in LATENCY:
            _number(step, "ack", key)
            _number(step, "baseline_unary_loaded", key)
        assert step["reports_acked"] > 0  # the clients' reports were committed and acked
        assert step["stream_errors"] == 0

    aim = result["aim"]
    assert aim["met"] is None  # quick mode never runs the aim's size
    assert isinstance(aim["target"], str) and isinstance(aim["why"], str)

    commands = result["commands"]
    for section in ("remote_grant", "local_grant", "remote_attest", "local_quote", "ping"):
        for key in LATENCY:
            _number(commands, section, key)
    assert _number(commands, "rounds", "count") >= 1
    _number(commands, "remote_grant_extra_p50_ms", "value")
    assert isinstance(commands["aim"]["met"], bool)

    setup = result["setup"]
    assert isinstance(setup["controller_pinning"], str) and setup["controller_pinning"]
    assert setup["controller_cpu"] in setup["cpus"]
    _number(setup, "fd_limit")


def _step(nodes: int, p99_ms: float, unacked: int = 0, errors: int = 0) -> dict[str, Any]:
    ack = {"p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": p99_ms, "mean_ms": 1.0}
    return {"nodes": nodes, "ack": ack, "reports_unacked": unacked, "stream_errors": errors}


@pytest.mark.parametrize(
    ("steps", "heartbeat_s", "met"),
    [
        ([_step(100, 5.0), _step(AIM_NODES, 27.0)], 10.0, True),
        ([_step(AIM_NODES, 150.0)], 10.0, False),
        ([_step(AIM_NODES, 20.0, unacked=3)], 10.0, False),
        ([_step(AIM_NODES, 20.0, errors=1)], 10.0, False),
        ([_step(AIM_NODES, 20.0)], 2.0, None),  # another heartbeat: not the aim's load
        ([_step(1000, 20.0)], 10.0, None),
    ],
)
def test_aim_is_judged_only_at_its_own_size_and_heartbeat(
    steps: list[dict[str, Any]], heartbeat_s: float, met: bool | None
) -> None:
    assert _aim(steps, heartbeat_s)["met"] is met
