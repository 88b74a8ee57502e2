"""``accelguard health [--json]``: per GPU its health, readings and last events; the partitions a
health fault holds until ``partition clear`` (docs/health.md)."""

from __future__ import annotations

import argparse
from typing import Any

from agent.cli.output import add_output, message_dict, print_json, table_time
from agent.config import Config, load_config
from agent.errors import ExitCode


def add_parsers(commands: argparse._SubParsersAction[Any]) -> None:
    health = commands.add_parser("health", help="GPU health: state, readings, events, holds")
    health.add_argument("--events", type=int, default=10, help="last events per GPU (default 10)")
    add_output(health)


def run(args: argparse.Namespace, config: Config | None = None) -> int:
    if config is None:
        config = load_config(args.config)
    from agent.admin.client import AdminClient  # noqa: PLC0415

    with AdminClient(config.admin.socket) as client:
        report = client.health(args.events)
    if args.json:
        print_json(message_dict(report))
    else:
        _print(report)
    if not report.monitoring:
        return int(ExitCode.FAILED)
    # 0 when every GPU is healthy: scripts and node checks can rely on it.
    return int(ExitCode.OK if all(g.state == "healthy" for g in report.gpus) else ExitCode.FAILED)


def _print(report: Any) -> None:
    if not report.monitoring:
        print("the health monitor is not running ([health] enabled = false, or starting)")
        return
    for gpu in report.gpus:
        reset = ", GPU reset required" if gpu.reset_required else ""
        readings = ""
        if gpu.temperature_c >= 0:
            readings = (f"  {gpu.temperature_c} C, {gpu.power_w:.0f} W, DBE {gpu.ecc_aggregate_dbe}"
                        f", remap pending {'yes' if gpu.remap_pending else 'no'}")  # fmt: skip
        print(f"gpu {gpu.index} {gpu.uuid}  {gpu.state}{reset}{readings}")
        for event in gpu.events:
            print(f"  {table_time(event.at)} {event.kind} {event.code} -> {event.action}: "
                  f"{event.detail}")  # fmt: skip
    for hold in report.holds:
        print(f"held: {hold.partition_uuid} since {table_time(hold.at)}: {hold.reason} "
              "(ends with `accelguard partition clear`)")  # fmt: skip
