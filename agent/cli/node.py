"""``accelguard agent``, ``status`` and ``config check``: the daemon, what it sees, its config."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.cli.output import message_dict, print_json
from agent.config import Config, load_config, to_toml


def add_parsers(commands: argparse._SubParsersAction[Any]) -> None:
    commands.add_parser("agent", help="run the daemon in the foreground")

    status = commands.add_parser("status", help="GPUs, MIG instances and partitions")
    status.add_argument("--json", action="store_true")

    config = commands.add_parser("config", help="configuration")
    config_verbs = config.add_subparsers(dest="verb", required=True)
    check = config_verbs.add_parser("check", help="validate the config and print the effective one")
    check.add_argument(
        "--controller", type=Path, metavar="FILE",
        help="check a controller.toml instead of the agent's config",
    )  # fmt: skip


def run(args: argparse.Namespace, config: Config | None = None) -> int:
    if args.command == "config" and args.controller is not None:
        from agent.controller.config import (  # noqa: PLC0415
            controller_config_toml,
            load_controller_config,
        )

        print(controller_config_toml(load_controller_config(args.controller)), end="")
        return 0
    if config is None:
        config = load_config(args.config)
    if args.command == "config":
        print(to_toml(config), end="")
        return 0
    if args.command == "agent":
        from agent.daemon import run_daemon  # noqa: PLC0415
        from agent.runtime.logs import configure_logging  # noqa: PLC0415

        configure_logging(config.logging)
        return run_daemon(config)
    from agent.admin.client import AdminClient  # noqa: PLC0415

    with AdminClient(config.admin.socket) as client:
        status = client.status()
    if args.json:
        print_json(message_dict(status))
    else:
        _print_status(status)
    return 0


def _print_status(status: Any) -> None:
    print(f"node {status.node_id}  agent {status.agent_version}  driver {status.driver_version}")
    key = "".join(status.node_public_key.splitlines()[1:-1])
    print(f"node key (Ed25519, signs scrub certificates): {key}")
    link = status.link
    if not link.configured:
        print("link: none (link.controller is empty)")
    else:
        state = f"connected over {link.transport}" if link.connected else "disconnected"
        if link.fallback_enabled:
            state += f", MQTT fallback on ({link.failovers} failovers, {link.failbacks} failbacks)"
        print(f"link: {state}, {link.unacked} reports unacked")
        if not link.connected and link.last_error:
            print(f"  last error: {link.last_error}")
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
