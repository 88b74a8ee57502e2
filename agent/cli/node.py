"""``accelguard agent``, ``status`` and ``config check|init``: the daemon, what it sees, its config.

``config init`` writes the commented default config (``agent/config_template.toml``: every key at
its default, commented out) and never replaces an existing file without ``--force``: the file is
written in full under a temporary name, then linked into place (which fails if the path exists)
or, with ``--force``, renamed over it, so a reader sees the old file or the new one, never a part.
"""

from __future__ import annotations

import argparse
import os
from importlib import resources
from pathlib import Path
from typing import Any, Final

from agent.cli.output import add_output, message_dict, print_json
from agent.config import DEFAULT_CONFIG_PATH, Config, load_config, to_toml
from agent.errors import AccelguardError, ConfigError
from agent.runtime.files import publish_file

# The config holds no secret (keys live in node.state_dir and link.cert_dir, 0600), and every
# user who may run `accelguard status` must read it to find the admin socket.
CONFIG_FILE_MODE: Final = 0o644
CONFIG_DIR_MODE: Final = 0o755


def add_parsers(commands: argparse._SubParsersAction[Any]) -> None:
    commands.add_parser("agent", help="run the daemon in the foreground")

    status = commands.add_parser("status", help="GPUs, MIG instances and partitions")
    add_output(status)

    config = commands.add_parser("config", help="configuration")
    config_verbs = config.add_subparsers(dest="verb", required=True)
    check = config_verbs.add_parser("check", help="validate the config and print the effective one")
    check.add_argument(
        "--controller", type=Path, metavar="FILE",
        help="check a controller.toml instead of the agent's config",
    )  # fmt: skip
    init = config_verbs.add_parser(
        "init", help="write the commented default config (every key at its default)"
    )
    init.add_argument(
        "--path", type=Path, metavar="FILE",
        help=f"where to write it (default: --config, else {DEFAULT_CONFIG_PATH})",
    )  # fmt: skip
    init.add_argument("--force", action="store_true", help="replace an existing file")
    # `config check --controller` reads only that file; init has no such option.
    init.set_defaults(controller=None)


def run(args: argparse.Namespace, config: Config | None = None) -> int:
    if args.command == "config" and args.verb == "init":
        path = args.path or args.config or DEFAULT_CONFIG_PATH
        write_config_template(path, force=args.force)
        print(f"wrote {path}: every key commented out at its default; check it with")
        print(f"  {_check_hint(path)}")
        return 0
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
        if gpu.vendor == "huawei":
            split = f"{len(gpu.instances)} vNPUs" if gpu.instances else "whole (no vNPUs)"
            print(f"NPU {gpu.index}  {gpu.uuid}  {gpu.name}  {split}")
        elif gpu.vendor == "accel":
            print(f"accel {gpu.index}  {gpu.uuid}  {gpu.name}  {gpu.pci_bus_id}")
        else:
            print(f"GPU {gpu.index}  {gpu.uuid}  {gpu.name}  MIG {mig}")
        whole = states.get(gpu.uuid)
        if whole is not None:
            print(f"  partition {whole.uuid}  {whole.state}  {'clean' if whole.clean else 'dirty'}")
        for inst in gpu.instances:
            part = states.get(inst.uuid)
            state = f"{part.state}  {'clean' if part.clean else 'dirty'}" if part else "no CI"
            if gpu.vendor == "huawei":
                # A vNPU: its vdev id (the N of /dev/vdavinciN) and the AI Cores' memory units.
                where = f"vNPU {inst.gpu_instance_id:<4} units {inst.placement_size:<2}"
            else:
                where = (
                    f"GI {inst.gpu_instance_id:<2} CI {inst.compute_instance_id}  "
                    f"placement {inst.placement_start}:{inst.placement_size}"
                )
            print(f"  {inst.profile:<12} {where}  {inst.uuid or '-'}  {state}")


def config_template() -> str:
    """The commented default config, as shipped in the package."""
    return resources.files("agent").joinpath("config_template.toml").read_text(encoding="utf-8")


def write_config_template(path: Path, *, force: bool) -> None:
    """Write :func:`config_template` to ``path`` (mode 0644), creating missing parent
    directories 0755; an existing ``path`` is replaced only with ``force``."""
    if not force and os.path.lexists(path):
        raise ConfigError(f"{path} exists: not replaced (pass --force to overwrite it)")
    data = config_template().encode()
    try:
        _make_directories(path.parent)
        publish_file(path, lambda stream: stream.write(data), mode=CONFIG_FILE_MODE, replace=force)
    except FileExistsError:
        raise ConfigError(f"{path} exists: not replaced (pass --force to overwrite it)") from None
    except OSError as error:
        raise AccelguardError(f"cannot write {path}: {error.strerror}") from error


def _make_directories(directory: Path) -> None:
    """Create ``directory`` and missing parents with mode 0755 whatever the umask."""
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for created in reversed(missing):
        created.mkdir(mode=CONFIG_DIR_MODE, exist_ok=True)
        created.chmod(CONFIG_DIR_MODE)


def _check_hint(path: Path) -> str:
    if path == DEFAULT_CONFIG_PATH:
        return "accelguard config check"
    return f"accelguard --config {path} config check"
