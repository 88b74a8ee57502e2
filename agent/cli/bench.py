"""``accelguard bench layout|lease|scrub|attest|link|health|audit``: each prints one JSON document
with a baseline measured in the same run (agent/bench), whose modules are imported when it runs."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.cli.output import print_json
from agent.errors import ValidationError


def add_parsers(commands: argparse._SubParsersAction[Any]) -> None:
    bench = commands.add_parser("bench", help="benchmarks (JSON with a same-run baseline)")
    bench_verbs = bench.add_subparsers(dest="verb", required=True)
    bench_layout = bench_verbs.add_parser("layout", help="apply/tear down a 7-instance layout")
    bench_layout.add_argument("--rounds", type=int, default=20)
    bench_layout.add_argument("--dir", type=Path, help="scratch directory (default: a temp dir)")
    bench_lease = bench_verbs.add_parser("lease", help="grant and release-to-clean latency")
    bench_lease.add_argument("--rounds", type=int, default=50)
    bench_lease.add_argument("--dir", type=Path, help="scratch directory (default: a temp dir)")
    bench_scrub = bench_verbs.add_parser("scrub", help="scrub bandwidth against memset")
    bench_scrub.add_argument("--rounds", type=int, default=3)
    bench_scrub.add_argument("--dir", type=Path, help="scratch directory (default: a temp dir)")
    bench_audit = bench_verbs.add_parser(
        "audit", help="an audited grant and release beside the same calls with auditing off"
    )
    bench_audit.add_argument("--rounds", type=int, default=40)
    bench_audit.add_argument("--dir", type=Path, help="scratch directory (default: a temp dir)")
    add_bench_attest(bench_verbs)
    # Light at import (standard library only at its top); it imports gRPC when it runs.
    from agent.bench.link import add_bench_parser as add_bench_link  # noqa: PLC0415

    add_bench_link(bench_verbs)
    from agent.bench.health import add_bench_parser as add_bench_health  # noqa: PLC0415

    add_bench_health(bench_verbs)


def add_bench_attest(bench_verbs: argparse._SubParsersAction[Any]) -> None:
    bench = bench_verbs.add_parser(
        "attest",
        help="event-log, IMA, quote and full-evidence verification against same-run baselines",
    )
    bench.add_argument("--rounds", type=int, default=5, help="repetitions; the median is kept")
    bench.add_argument(
        "--ima-entries", type=int, default=100_000, help="synthetic IMA list size (default 100k)"
    )
    bench.add_argument(
        "--event-log-kib", type=int, default=1024, help="synthetic event log size (default 1 MiB)"
    )
    bench.add_argument(
        "--quotes", type=int, default=200, help="quote verifications per round (default 200)"
    )
    bench.add_argument(
        "--evidence-intervals",
        type=int,
        default=200,
        help="full-evidence verifications, one per interval; the p50 is reported (default 200)",
    )
    bench.add_argument(
        "--evidence-event-log",
        type=Path,
        help="a real firmware event log for the full-evidence measurement (default: synthetic)",
    )


def run(args: argparse.Namespace) -> int:
    if args.verb == "attest":
        print_json(run_bench_attest(args))
        return 0
    if args.verb == "health":
        from agent.bench.health import run_bench as run_bench_health  # noqa: PLC0415

        print_json(run_bench_health(args))
        return 0
    if args.verb == "link":
        from agent.bench.link import run_bench as run_bench_link  # noqa: PLC0415

        print_json(run_bench_link(args))
        return 0
    if args.rounds < 1:
        raise ValidationError("--rounds must be at least 1")
    print_json(_node_benchmark(args.verb)(args.rounds, args.dir))
    return 0


def _node_benchmark(verb: str) -> Callable[[int, Path | None], dict[str, Any]]:
    # Imported here: each pulls in what it measures (pynvml, the layout engine, the sim node).
    if verb == "layout":
        from agent.bench.layout import bench_layout  # noqa: PLC0415

        return bench_layout
    if verb == "lease":
        from agent.bench.lease import bench_lease  # noqa: PLC0415

        return bench_lease
    if verb == "audit":
        from agent.bench.audit import bench_audit  # noqa: PLC0415

        return bench_audit
    from agent.bench.scrub import bench_scrub  # noqa: PLC0415

    return bench_scrub


def run_bench_attest(args: argparse.Namespace) -> dict[str, Any]:
    from agent.bench.attest import bench_attest  # noqa: PLC0415 - only the bench needs it

    for name in ("rounds", "ima_entries", "event_log_kib", "quotes", "evidence_intervals"):
        if getattr(args, name) < 1:
            raise ValidationError(f"--{name.replace('_', '-')} must be at least 1")
    event_log: bytes | None = None
    if args.evidence_event_log is not None:
        from agent.attest.logs.eventlog import MAX_LOG_BYTES  # noqa: PLC0415
        from agent.attest.reader import read_bounded  # noqa: PLC0415
        from agent.errors import EventLogError  # noqa: PLC0415

        event_log = read_bounded(args.evidence_event_log, MAX_LOG_BYTES, "event log", EventLogError)
    return bench_attest(
        rounds=args.rounds,
        ima_entries=args.ima_entries,
        event_log_bytes=args.event_log_kib * 1024,
        quotes=args.quotes,
        evidence_intervals=args.evidence_intervals,
        evidence_event_log=event_log,
    )
