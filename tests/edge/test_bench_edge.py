"""``accelguard bench link --transport mqtt --quick``: a real controller with its bridge, a real
mosquitto, the real link service; the document has every number it promises (values are not
judged: no timing is asserted)."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from agent.bench.link import add_bench_parser, run_bench

LATENCY = ("p50_ms", "p90_ms", "p99_ms", "mean_ms")


def _number(value: Any) -> float:
    assert isinstance(value, int | float) and not isinstance(value, bool), value
    assert math.isfinite(value) and value >= 0, value
    return float(value)


def test_quick_edge_bench_reports_round_trips_failover_and_failback() -> None:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="verb", required=True))
    result = run_bench(parser.parse_args(["link", "--transport", "mqtt", "--quick"]))
    json.dumps(result)
    assert (result["benchmark"], result["transport"], result["quick"]) == ("link", "mqtt", True)
    trip = result["round_trip"]
    for section in ("mqtt", "grpc_baseline"):
        for key in LATENCY:
            _number(trip[section][key])
    assert _number(trip["ratio_p50"]) > 0
    switch = result["switch"]
    assert switch["cycles"] == len(switch["failover_s"]["all"]) == len(switch["failback_s"]["all"])
    for name, configured in (
        ("failover_s", "fallback_after_s"),
        ("failback_s", "failback_after_s"),
    ):
        # Each switch waits its configured delay first: a shorter time would mean it did not.
        assert min(switch[name]["all"]) >= switch[configured], (name, switch)
    assert isinstance(switch["aim"]["met"], bool)
