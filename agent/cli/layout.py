"""``accelguard layout plan|apply|assert|export|desired``: declarative MIG layouts, from arguments
or a mig-parted file, with mig-parted's verbs (docs/layouts.md).

``apply --wait S`` then waits until every partition of the GPUs it touched is free and clean:
exit 0, 3 if one ended quarantined, 75 if some are still being scrubbed after S seconds; an
``after_apply`` hook that failed is exit 1 (the layout stays applied). ``assert`` is a plan read
for its answer: exit 0 when the node already has the layout (the plan has nothing to do), 1 with
the difference when it has not; without a layout it asserts the desired one the agent keeps.
``export`` writes the node's current layout as a mig-parted file that ``apply -f`` and
``assert -f`` take back. ``desired`` shows (or ``--forget``s) the desired layout.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from agent.cli.output import (
    PROG,
    add_output,
    message_dict,
    partition_line,
    print_json,
    progress,
    table_time,
)
from agent.config import Config, load_config
from agent.errors import ExitCode, LayoutError, NotFoundError
from agent.runtime.inputs import seconds

# mig-parted's `export` names its config "current" unless told otherwise.
DEFAULT_EXPORT_NAME = "current"


def add_parsers(commands: argparse._SubParsersAction[Any]) -> None:
    # allow_abbrev=False: argparse would otherwise read `--config F` (the global option, put
    # after the verb) as `--config-name F`, and `--cl` as `--clear`.
    layout = commands.add_parser("layout", help="declarative MIG layouts", allow_abbrev=False)
    layout_verbs = layout.add_subparsers(dest="verb", required=True)
    helps = {
        "plan": "show what applying a layout would change",
        "apply": "apply a layout (keeps the instances that fit)",
        "assert": "exit 0 if the node has the layout, else 1 with the difference",
    }
    for verb, text in helps.items():
        sub = layout_verbs.add_parser(verb, help=text, allow_abbrev=False)
        add_layout_arguments(sub)
        if verb == "apply":
            sub.add_argument(
                "--wait", type=seconds, default=0.0, metavar="S",
                help="wait up to S seconds until the GPUs' partitions are clean (exit 75 if not)",
            )  # fmt: skip
    export = layout_verbs.add_parser(
        "export", help="print the current layout as a mig-parted config file", allow_abbrev=False
    )
    export.add_argument(
        "--gpu", default="all", help="GPU index, comma-separated indices, or 'all' (default)"
    )
    export.add_argument(
        "-f", "--format", choices=["mig-parted"], default="mig-parted",
        help="output format (default mig-parted: YAML for `layout apply|assert -f FILE -c NAME`)",
    )  # fmt: skip
    export.add_argument(
        "--name", default=DEFAULT_EXPORT_NAME,
        help=f"the config's name under mig-configs (default {DEFAULT_EXPORT_NAME})",
    )  # fmt: skip
    desired = layout_verbs.add_parser(
        "desired", help="show the desired layout the agent re-applies at start-up",
        allow_abbrev=False,
    )  # fmt: skip
    desired.add_argument(
        "--forget", action="store_true",
        help="forget the desired layout of --gpu (not re-applied, not asserted any more)",
    )  # fmt: skip
    desired.add_argument(
        "--gpu", help="with --forget: GPU index, comma-separated indices or UUIDs, or 'all'"
    )
    add_output(desired)


def add_layout_arguments(sub: argparse.ArgumentParser) -> None:
    """The arguments of a layout (local `layout plan|apply|assert` and `ctl layout apply`)."""
    which = sub.add_mutually_exclusive_group()
    which.add_argument("--gpu", help="GPU index, comma-separated indices, or 'all'")
    which.add_argument(
        "--npu", help="Ascend NPU logic id, comma-separated ids, or 'all': TEMPLATE=COUNT vNPUs"
    )
    sub.add_argument("--mig", choices=["on", "off"], default="on", help="MIG mode (default on)")
    sub.add_argument(
        "--clear", action="store_true",
        help="no MIG instances at all: destroy every instance of the GPUs (MIG stays on)",
    )  # fmt: skip
    sub.add_argument("-f", "--file", type=Path, help="mig-parted config file (mig-configs YAML)")
    sub.add_argument("-c", "--config-name", help="which mig-config of --file")
    sub.add_argument("profiles", nargs="*", help="PROFILE=COUNT, e.g. 3g.40gb=2")
    add_output(sub)


def run(args: argparse.Namespace, config: Config | None = None) -> int:
    if config is None:
        config = load_config(args.config)
    from agent.admin.client import AdminClient  # noqa: PLC0415

    if args.verb == "export":
        with AdminClient(config.admin.socket) as client:
            return _export(client, args)
    if args.verb == "desired":
        return _desired(config, args)
    if args.verb == "assert" and _no_layout_given(args):
        with AdminClient(config.admin.socket) as client:
            return _assert_desired(client, args.json)
    # Check the arguments before reaching for the agent: a mistake is exit 2 whether it runs or not.
    request = layout_request(args)
    # An apply may wait for both hooks (layout.hook_timeout_s each) on top of its own work.
    timeout_s = 120.0 + 2 * config.layout.hook_timeout_s
    with AdminClient(config.admin.socket, timeout_s=timeout_s) as client:
        if args.verb == "assert":
            return _assert(client, request, args.json)
        if args.verb == "apply":
            response = client.apply_layout(request)
        else:
            response = client.plan_layout(request)
        if args.json:
            print_json(message_dict(response))
        else:
            device = "NPU" if getattr(args, "npu", None) is not None else "GPU"
            _print_layout(response, args.verb == "apply", device)
        failed_hooks = [hook for hook in response.hooks if not hook.ok]
        for hook in failed_hooks:
            print(f"{PROG}: {hook.error}; the layout was applied and stays", file=sys.stderr)
        if args.verb == "apply" and args.wait > 0:
            code = _wait_layout_clean(client, {g.gpu_index for g in response.gpus}, args.wait)
            if code != ExitCode.OK:
                return code
    return int(ExitCode.FAILED if failed_hooks else ExitCode.OK)


def _no_layout_given(args: argparse.Namespace) -> bool:
    return (
        args.file is None and args.gpu is None and not args.profiles and not args.clear
        and args.config_name is None and args.mig == "on"
    )  # fmt: skip


def layout_request(args: argparse.Namespace) -> Any:
    from agent.hw.mig.parted import load_mig_parted_file  # noqa: PLC0415
    from agent.hw.mig.planner import parse_layout_spec  # noqa: PLC0415
    from agent.proto.accelguard.v1 import admin_pb2 as pb  # noqa: PLC0415

    if args.file is not None:
        if args.gpu is not None or args.profiles or args.clear or not args.config_name:
            raise LayoutError("use either -f FILE -c NAME, or --gpu N|all PROFILE=COUNT...")
        entries = load_mig_parted_file(args.file, args.config_name)
        # A mig-parted entry with MIG on and no mig-devices (missing, {} or all zero) says "no
        # instances" in so many words, as mig-parted's "all-enabled" does: that is a clear.
        targets = [
            pb.LayoutTarget(
                all_gpus=entry.devices == "all",
                gpu_indices=[] if entry.devices == "all" else list(entry.devices),
                device_filter=list(entry.device_filter),
                mig_enabled=entry.mig_enabled,
                counts=dict(entry.mig_devices) if any(entry.mig_devices.values()) else {},
                clear=entry.mig_enabled and not any(entry.mig_devices.values()),
            )
            for entry in entries
        ]
        return pb.LayoutRequest(targets=targets)
    if getattr(args, "npu", None) is not None:
        return _npu_request(args)
    if args.gpu is None:
        raise LayoutError(
            "say which GPUs: --gpu N, --gpu 0,1 or --gpu all (or --npu N, or -f FILE -c NAME)"
        )
    counts = parse_layout_spec(args.profiles)
    if args.mig == "off" and (any(counts.values()) or args.clear):
        raise LayoutError("--mig off takes no PROFILE=COUNT and no --clear")
    if args.clear and args.profiles:
        raise LayoutError("--clear takes no PROFILE=COUNT: it asks for no MIG instances at all")
    if args.mig == "on" and not any(counts.values()) and not args.clear:
        # An empty layout means "destroy every free instance": too much to do by omission.
        # The agent refuses it too (a target needs clear), whoever sends it.
        raise LayoutError(
            f"no PROFILE=COUNT above 0 given for --gpu {args.gpu}: pass the instances to have "
            "(e.g. 3g.40gb=2), or --clear to remove every MIG instance"
        )
    indices = _gpu_indices(args.gpu)
    return pb.LayoutRequest(
        targets=[
            pb.LayoutTarget(
                all_gpus=indices is None,
                gpu_indices=indices or [],
                mig_enabled=args.mig == "on",
                counts=counts,
                clear=args.clear,
            )
        ]
    )


def _npu_request(args: argparse.Namespace) -> Any:
    """``--npu N TEMPLATE=COUNT...`` or ``--npu N --clear`` (no vNPUs: the NPU whole)."""
    from agent.hw.mig.planner import parse_layout_spec  # noqa: PLC0415
    from agent.proto.accelguard.v1 import admin_pb2 as pb  # noqa: PLC0415

    if args.mig == "off":
        raise LayoutError("--npu takes no --mig: NPUs have no MIG mode")
    counts = parse_layout_spec(args.profiles)
    if args.clear and args.profiles:
        raise LayoutError("--clear takes no TEMPLATE=COUNT: it asks for no vNPUs at all")
    if not any(counts.values()) and not args.clear:
        raise LayoutError(
            f"no TEMPLATE=COUNT above 0 given for --npu {args.npu}: pass the vNPUs to have "
            "(e.g. vir08=2), or --clear to remove every vNPU"
        )
    indices = _gpu_indices(args.npu, "--npu")
    target = pb.LayoutTarget(
        all_gpus=indices is None, gpu_indices=indices or [], mig_enabled=True, counts=counts,
        clear=args.clear, npu=True,
    )  # fmt: skip
    return pb.LayoutRequest(targets=[target])


def _gpu_indices(text: str, option: str = "--gpu") -> list[int] | None:
    """``--gpu`` (or ``--npu``): None for 'all', else the indices."""
    if text == "all":
        return None
    try:
        indices = [int(item) for item in text.split(",")]
    except ValueError:
        raise LayoutError(f"{option} {text!r}: expected an index, a comma list or 'all'") from None
    if any(i < 0 for i in indices):
        raise LayoutError(f"{option} {text!r}: indices are not negative")
    return indices


def _assert_desired(client: Any, as_json: bool) -> int:
    """``layout assert`` without a layout: the desired one the agent keeps. A GPU of it that is
    no longer on the node is a difference; no desired layout at all is exit 2."""
    from agent.proto.accelguard.v1 import admin_pb2 as pb  # noqa: PLC0415

    desired = client.desired_layout()
    if not desired.gpus:
        raise LayoutError(
            "no desired layout is recorded (`layout apply` records one): pass a layout "
            "(--gpu N PROFILE=COUNT..., --clear, --mig off, or -f FILE -c NAME)"
        )
    targets = [
        pb.LayoutTarget(
            gpu_indices=[gpu.gpu_index],
            mig_enabled=gpu.mig_enabled,
            counts=dict(gpu.counts),
            clear=gpu.clear,
        )
        for gpu in desired.gpus
        if gpu.present
    ]
    gone = [
        (gpu, [f"not on this node (GPU {gpu.gpu_index} when its desired layout was recorded)"])
        for gpu in desired.gpus
        if not gpu.present
    ]
    return _assert(client, pb.LayoutRequest(targets=targets), as_json, gone=gone)


def _assert(
    client: Any, request: Any, as_json: bool, gone: list[tuple[Any, list[str]]] | None = None
) -> int:
    """Exit 0 when the node has the layout, else 1 and the difference; reads, never changes."""
    response = client.plan_layout(request) if request.targets else None
    status = None
    gpus = []
    for gpu in response.gpus if response is not None else ():
        differences = [
            f"create {inst.profile} at placement {inst.placement_start}:{inst.placement_size}"
            for inst in gpu.created
        ] + [
            f"destroy {inst.profile} at placement {inst.placement_start}:{inst.placement_size} "
            f"({inst.uuid})"
            for inst in gpu.destroyed
        ]
        # The engine notes a MIG mode that is not in effect yet (it needs a GPU reset).
        if gpu.note:
            differences.append(gpu.note)
        if not gpu.noop and not differences:
            # Nothing to create or destroy, yet something to do: MIG mode on is not the pending
            # mode, or a GPU instance lost its compute instance (a crash mid-apply).
            if status is None:
                status = client.status()
            pending = any(g.mig_mode.pending for g in status.gpus if g.index == gpu.gpu_index)
            differences.append(
                "complete GPU instances that have no compute instance"
                if pending
                else "MIG mode on is not set (pending mode: off)"
            )
        gpus.append((gpu, differences))
    missing = gone or []
    matches = all(not differences for _, differences in gpus) and not missing
    if as_json:
        print_json(
            {
                "matches": matches,
                "gpus": [
                    {**message_dict(gpu), "matches": not differences, "differences": differences}
                    for gpu, differences in gpus
                ]
                + [
                    {
                        "gpu_uuid": gpu.gpu_uuid,
                        "gpu_index": gpu.gpu_index,
                        "present": False,
                        "matches": False,
                        "differences": differences,
                    }
                    for gpu, differences in missing
                ],
            }
        )
    else:
        for gpu, differences in gpus:
            print(f"GPU {gpu.gpu_index}: {'differs' if differences else 'matches'}")
            for difference in differences:
                print(f"  {difference}")
        for gpu, differences in missing:
            print(f"GPU {gpu.gpu_uuid}: differs")
            for difference in differences:
                print(f"  {difference}")
    return int(ExitCode.OK if matches else ExitCode.FAILED)


def _desired(config: Config, args: argparse.Namespace) -> int:
    """``layout desired [--forget --gpu ...]``: what the agent re-applies at start-up."""
    from agent.admin.client import AdminClient  # noqa: PLC0415
    from agent.proto.accelguard.v1 import admin_pb2 as pb  # noqa: PLC0415

    if args.forget and args.gpu is None:
        raise LayoutError("--forget needs --gpu N, --gpu 0,1, --gpu GPU-UUID or --gpu all")
    if args.gpu is not None and not args.forget:
        raise LayoutError("--gpu goes with --forget: `layout desired` shows every GPU")
    with AdminClient(config.admin.socket) as client:
        if args.forget:
            request = pb.DesiredLayoutRequest(all_gpus=args.gpu == "all")
            if args.gpu != "all":
                for item in args.gpu.split(","):
                    if item.strip().startswith("GPU-"):
                        request.gpu_uuids.append(item.strip())
                    else:
                        request.gpu_indices.extend(_gpu_indices(item) or [])
            response = client.forget_desired_layout(request)
        else:
            response = client.desired_layout()
    if args.json:
        print_json(message_dict(response))
        return 0
    if not response.gpus:
        print("no desired layout is recorded", file=sys.stderr)
        return 0
    for gpu in response.gpus:
        if not gpu.mig_enabled:
            layout = "MIG off"
        elif gpu.clear:
            layout = "MIG on, no instances (--clear)"
        else:
            layout = " ".join(f"{name}={count}" for name, count in sorted(gpu.counts.items()))
        where = f"GPU {gpu.gpu_index}" if gpu.present else f"GPU {gpu.gpu_index} (gone)"
        print(f"{where} {gpu.gpu_uuid}: {layout}")
        print(f"  recorded {table_time(gpu.recorded_at)} by {gpu.recorded_by or 'unknown'}")
        checked = f" ({table_time(gpu.checked_at)})" if gpu.checked_at else ""
        print(
            f"  {gpu.outcome}{checked}" + (f": {gpu.outcome_detail}" if gpu.outcome_detail else "")
        )
    if not response.reapply_at_start:
        print("(layout.reapply_at_start is off: checked at start-up, not re-applied)")
    return 0


def _export(client: Any, args: argparse.Namespace) -> int:
    """The current layout as a mig-parted file: GPUs with the same layout share one entry."""
    from agent.hw.mig.parted import MigPartedEntry, dump_mig_parted  # noqa: PLC0415

    status = client.status()
    wanted = _gpu_indices(args.gpu)
    by_index = {gpu.index: gpu for gpu in status.gpus}
    for index in wanted or ():
        if index not in by_index:
            raise NotFoundError(
                f"GPU index {index} does not exist (this node has GPUs "
                f"{', '.join(map(str, sorted(by_index))) or 'none'})"
            )
    selected = [by_index[i] for i in sorted(by_index if wanted is None else set(wanted))]
    if not selected:
        raise NotFoundError("this node has no GPU to export")
    groups: dict[tuple[bool, tuple[tuple[str, int], ...]], list[int]] = {}
    for gpu in selected:
        # The pending mode is the one the GPU is set to; a layout with a different one pending
        # is exported as it will be after the reset (when MIG goes off, its instances go too).
        enabled = gpu.mig_mode.pending
        if gpu.mig_mode.current != gpu.mig_mode.pending:
            print(
                f"{PROG}: warning: GPU {gpu.index}: MIG mode {'on' if enabled else 'off'} is "
                "pending until a GPU reset; exported as it will be after the reset",
                file=sys.stderr,
            )
        live = enabled and gpu.mig_mode.current
        counts = Counter(inst.profile for inst in gpu.instances) if live else Counter()
        groups.setdefault((enabled, tuple(sorted(counts.items()))), []).append(gpu.index)
    entries = [
        MigPartedEntry(
            devices=tuple(indices),
            device_filter=(),
            mig_enabled=enabled,
            mig_devices=dict(counts),
        )
        for (enabled, counts), indices in sorted(groups.items(), key=lambda item: item[1][0])
    ]
    sys.stdout.write(dump_mig_parted(args.name, entries))
    return 0


def _print_layout(response: Any, applied: bool, device: str = "GPU") -> None:
    for gpu in response.gpus:
        verb = "unchanged" if gpu.noop else ("applied" if applied else "plan")
        if gpu.waiting_for_reset:
            mode = gpu.mig_mode
            verb += (
                f", waiting for a GPU reset (MIG {'on' if mode.pending else 'off'} set, "
                f"{'on' if mode.current else 'off'} in effect)"
            )
        print(f"{device} {gpu.gpu_index}: {verb}")
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
    for hook in response.hooks:
        outcome = "ok" if hook.ok else "FAILED"
        print(f"hook {hook.phase}: {' '.join(hook.argv)}: {outcome} ({hook.duration_s:.1f}s)")


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
