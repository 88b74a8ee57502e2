"""``accelguard layout plan|apply``: declarative MIG layouts, from arguments or a mig-parted file.

``apply --wait S`` then waits until every partition of the GPUs it touched is free and clean:
exit 0, 3 if one ended quarantined, 75 if some are still being scrubbed after S seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from agent.cli.output import PROG, message_dict, partition_line, print_json, progress
from agent.config import Config, load_config
from agent.errors import ExitCode, LayoutError
from agent.runtime.inputs import seconds


def add_parsers(commands: argparse._SubParsersAction[Any]) -> None:
    layout = commands.add_parser("layout", help="declarative MIG layouts")
    layout_verbs = layout.add_subparsers(dest="verb", required=True)
    for verb in ("plan", "apply"):
        sub = layout_verbs.add_parser(verb, help=f"{verb} a layout")
        add_layout_arguments(sub)
        if verb == "apply":
            sub.add_argument(
                "--wait", type=seconds, default=0.0, metavar="S",
                help="wait up to S seconds until the GPUs' partitions are clean (exit 75 if not)",
            )  # fmt: skip


def add_layout_arguments(sub: argparse.ArgumentParser) -> None:
    """The arguments of a layout (local `layout plan|apply` and `ctl layout apply`)."""
    sub.add_argument("--gpu", help="GPU index, comma-separated indices, or 'all'")
    sub.add_argument("--mig", choices=["on", "off"], default="on", help="MIG mode (default on)")
    sub.add_argument("-f", "--file", type=Path, help="mig-parted config file (mig-configs YAML)")
    sub.add_argument("-c", "--config-name", help="which mig-config of --file")
    sub.add_argument("profiles", nargs="*", help="PROFILE=COUNT, e.g. 3g.40gb=2")
    sub.add_argument("--json", action="store_true")


def run(args: argparse.Namespace, config: Config | None = None) -> int:
    if config is None:
        config = load_config(args.config)
    request = layout_request(args)
    from agent.admin.client import AdminClient  # noqa: PLC0415

    with AdminClient(config.admin.socket) as client:
        if args.verb == "apply":
            response = client.apply_layout(request)
        else:
            response = client.plan_layout(request)
        if args.json:
            print_json(message_dict(response))
        else:
            _print_layout(response, args.verb == "apply")
        if args.verb == "apply" and args.wait > 0:
            return _wait_layout_clean(client, {g.gpu_index for g in response.gpus}, args.wait)
    return 0


def layout_request(args: argparse.Namespace) -> Any:
    from agent.hw.mig.parted import load_mig_parted_file  # noqa: PLC0415
    from agent.hw.mig.planner import parse_layout_spec  # noqa: PLC0415
    from agent.proto.accelguard.v1 import admin_pb2 as pb  # noqa: PLC0415

    if args.file is not None:
        if args.gpu is not None or args.profiles or not args.config_name:
            raise LayoutError("use either -f FILE -c NAME, or --gpu N|all PROFILE=COUNT...")
        entries = load_mig_parted_file(args.file, args.config_name)
        targets = [
            pb.LayoutTarget(
                all_gpus=entry.devices == "all",
                gpu_indices=[] if entry.devices == "all" else list(entry.devices),
                device_filter=list(entry.device_filter),
                mig_enabled=entry.mig_enabled,
                counts=dict(entry.mig_devices),
            )
            for entry in entries
        ]
        return pb.LayoutRequest(targets=targets)
    if args.gpu is None:
        raise LayoutError(
            "say which GPUs: --gpu N, --gpu 0,1 or --gpu all (or use -f FILE -c NAME)"
        )
    counts = parse_layout_spec(args.profiles)
    if args.mig == "off" and any(counts.values()):
        raise LayoutError("--mig off takes no PROFILE=COUNT")
    if args.gpu == "all":
        indices: list[int] = []
    else:
        try:
            indices = [int(item) for item in args.gpu.split(",")]
        except ValueError:
            raise LayoutError(
                f"--gpu {args.gpu!r}: expected an index, a comma list or 'all'"
            ) from None
        if any(i < 0 for i in indices):
            raise LayoutError(f"--gpu {args.gpu!r}: GPU indices are not negative")
    return pb.LayoutRequest(
        targets=[
            pb.LayoutTarget(
                all_gpus=args.gpu == "all",
                gpu_indices=indices,
                mig_enabled=args.mig == "on",
                counts=counts,
            )
        ]
    )


def _print_layout(response: Any, applied: bool) -> None:
    for gpu in response.gpus:
        verb = "unchanged" if gpu.noop else ("applied" if applied else "plan")
        print(f"GPU {gpu.gpu_index}: {verb}")
        for label, items in (
            ("keep", gpu.kept),
            ("destroy", gpu.destroyed),
            ("create", gpu.created),
        ):
            for inst in items:
                where = f"{inst.placement_start}:{inst.placement_size}"
                print(f"  {label:<8} {inst.profile:<12} placement {where} {inst.uuid}")
        if gpu.note:
            print(f"  note: {gpu.note}")


def _wait_layout_clean(client: Any, gpu_indices: set[int], wait_s: float) -> int:
    """Wait until every partition of the GPUs is free and clean (0), or one is quarantined."""
    deadline = time.monotonic() + wait_s
    while True:
        partitions = [p for p in client.list_partitions().partitions if p.gpu_index in gpu_indices]
        quarantined = [p for p in partitions if p.state == "quarantined"]
        pending = [p for p in partitions if not (p.state == "free" and p.clean)]
        if quarantined:
            progress("")
            for partition in quarantined:
                print(f"quarantined: {partition_line(partition)}", file=sys.stderr)
            return int(ExitCode.QUARANTINED)
        if not pending:
            progress("")
            return int(ExitCode.OK)
        left = deadline - time.monotonic()
        if left <= 0:
            progress("")
            print(
                f"{PROG}: {len(pending)} partitions not clean yet after {wait_s:g}s",
                file=sys.stderr,
            )
            return int(ExitCode.RETRY_LATER)
        progress(f"waiting for {len(pending)} partitions to be scrubbed ({left:.0f}s left)")
        time.sleep(min(0.2, left))
