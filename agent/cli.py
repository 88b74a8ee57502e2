"""``accelguard``: argument parsing and output only; the work happens in the daemon and services.

Errors print one line on stderr and exit non-zero (2 for rejected input, 1 otherwise); ``--debug``
shows the traceback instead. ``--json`` prints exactly one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from agent import __version__
from agent.config import Config, load_config, to_toml
from agent.errors import AccelguardError, LayoutError

PROG = "accelguard"


def _message_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _print_json(document: Any) -> None:
    json.dump(document, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="accelerator isolation agent")
    parser.add_argument(
        "--config", type=Path, help="agent config (default /etc/accelguard/agent.toml)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("agent", help="run the daemon in the foreground")

    status = commands.add_parser("status", help="GPUs, MIG instances and partitions")
    status.add_argument("--json", action="store_true")

    config = commands.add_parser("config", help="configuration")
    config_verbs = config.add_subparsers(dest="verb", required=True)
    config_verbs.add_parser("check", help="validate the config and print the effective one")

    layout = commands.add_parser("layout", help="declarative MIG layouts")
    layout_verbs = layout.add_subparsers(dest="verb", required=True)
    for verb in ("plan", "apply"):
        sub = layout_verbs.add_parser(verb, help=f"{verb} a layout")
        sub.add_argument("--gpu", help="GPU index, comma-separated indices, or 'all'")
        sub.add_argument("--mig", choices=["on", "off"], default="on", help="MIG mode (default on)")
        sub.add_argument(
            "-f", "--file", type=Path, help="mig-parted config file (mig-configs YAML)"
        )
        sub.add_argument("-c", "--config-name", help="which mig-config of --file")
        sub.add_argument("profiles", nargs="*", help="PROFILE=COUNT, e.g. 3g.40gb=2")
        sub.add_argument("--json", action="store_true")

    sim = commands.add_parser("sim", help="the simulated node (no GPU needed)")
    sim_verbs = sim.add_subparsers(dest="verb", required=True)
    init = sim_verbs.add_parser("init", help="build a simulated node under a directory")
    init.add_argument("--dir", type=Path, required=True)
    init.add_argument("--topology", default="h100x2", help="e.g. h100x2, a100x2, h100x1,a100-80x1")
    init.add_argument("--cgroup-parent", type=Path, action="append", default=[],
                      help="cgroup under which tenant cgroups must live (repeatable)")  # fmt: skip
    init.add_argument("--mig-off", action="store_true", help="start with MIG mode disabled")

    bench = commands.add_parser("bench", help="benchmarks (JSON with a same-run baseline)")
    bench_verbs = bench.add_subparsers(dest="verb", required=True)
    bench_layout = bench_verbs.add_parser("layout", help="apply/tear down a 7-instance layout")
    bench_layout.add_argument("--rounds", type=int, default=20)
    bench_layout.add_argument("--dir", type=Path, help="scratch directory (default: a temp dir)")
    return parser


def _layout_request(args: argparse.Namespace) -> Any:
    from agent.hw.migparted import load_mig_parted_file  # noqa: PLC0415
    from agent.hw.migplan import parse_layout_spec  # noqa: PLC0415
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


def _client(config: Config) -> Any:
    from agent.client import AdminClient  # noqa: PLC0415

    return AdminClient(config.admin.socket)


def _print_status(status: Any) -> None:
    print(f"node {status.node_id}  agent {status.agent_version}  driver {status.driver_version}")
    states = {p.uuid: p for p in status.partitions}
    for gpu in status.gpus:
        mig = "on" if gpu.mig_mode.current else "off"
        if gpu.reset_required:
            mig += f" (pending {'on' if gpu.mig_mode.pending else 'off'}: GPU reset required)"
        print(f"GPU {gpu.index}  {gpu.uuid}  {gpu.name}  MIG {mig}")
        whole = states.get(gpu.uuid)
        if whole is not None:
            print(f"  partition {whole.uuid}  {whole.state}  {'clean' if whole.clean else 'dirty'}")
        for inst in gpu.instances:
            part = states.get(inst.uuid)
            state = f"{part.state}  {'clean' if part.clean else 'dirty'}" if part else "no CI"
            print(
                f"  {inst.profile:<12} GI {inst.gpu_instance_id:<2} CI {inst.compute_instance_id}  "
                f"placement {inst.placement_start}:{inst.placement_size}  "
                f"{inst.uuid or '-'}  {state}"
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


def _run(args: argparse.Namespace) -> int:
    if args.command == "sim" and args.verb == "init":
        from agent.sim.node import init_sim_node  # noqa: PLC0415

        node = init_sim_node(args.dir, args.topology, args.cgroup_parent, not args.mig_off)
        print(f"simulated node with {len(node.gpus)} GPUs ({', '.join(node.gpus)}) in {node.root}")
        print(f"config: {node.config_path}")
        return 0
    if args.command == "bench":
        from agent.bench import bench_layout  # noqa: PLC0415

        _print_json(bench_layout(args.rounds, args.dir))
        return 0

    config = load_config(args.config)
    if args.command == "config":
        print(to_toml(config), end="")
        return 0
    if args.command == "agent":
        from agent.daemon import run_daemon  # noqa: PLC0415
        from agent.logs import configure_logging  # noqa: PLC0415

        configure_logging(config.logging)
        return run_daemon(config)
    if args.command == "status":
        with _client(config) as client:
            status = client.status()
        if args.json:
            _print_json(_message_dict(status))
        else:
            _print_status(status)
        return 0
    if args.command == "layout":
        request = _layout_request(args)
        with _client(config) as client:
            if args.verb == "apply":
                response = client.apply_layout(request)
            else:
                response = client.plan_layout(request)
        if args.json:
            _print_json(_message_dict(response))
        else:
            _print_layout(response, args.verb == "apply")
        return 0
    raise AssertionError(f"unhandled command {args.command}")  # pragma: no cover


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (AccelguardError, ExceptionGroup) as raised:
        error = _first_accelguard_error(raised)
        if args.debug or error is None:
            raise
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130


def _first_accelguard_error(raised: BaseException) -> AccelguardError | None:
    """The error to report; a daemon service that failed arrives wrapped by its TaskGroup."""
    if isinstance(raised, AccelguardError):
        return raised
    if isinstance(raised, BaseExceptionGroup):
        for inner in raised.exceptions:
            found = _first_accelguard_error(inner)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
