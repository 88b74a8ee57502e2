"""``accelguard state recover|export|import``: the agent's state directory.

``recover`` sets a damaged journal aside so that the agent can start again (every partition
quarantined). ``export`` writes a backup while the agent runs; ``import`` restores one on a
stopped agent (agent/store/backup.py, agent/store/restore.py, docs/operations.md "Backup and
restore"). ``recover`` and ``import`` take the agent's own state-directory lock, so they are
refused while an agent runs.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.cli.output import add_output, print_json
from agent.config import Config, load_config
from agent.errors import ExitCode, StoreError, ValidationError

# A passphrase file holds one line; nobody types a megabyte.
_MAX_PASSPHRASE_BYTES = 4096


def add_parsers(commands: argparse._SubParsersAction[Any]) -> None:
    state = commands.add_parser("state", help="the agent's journal: recover, export, import")
    state_verbs = state.add_subparsers(dest="verb", required=True)
    state_verbs.add_parser(
        "recover",
        help="set a corrupt journal aside; the agent then starts with every partition quarantined",
    )
    export = state_verbs.add_parser(
        "export", help="write a backup of the journal (and, encrypted, the node identity)"
    )
    export.add_argument("file", type=Path, help="the backup file to write (mode 0600)")
    export.add_argument(
        "--identity",
        choices=("exclude", "encrypt"),
        default="exclude",
        help="the node's keys and certificates: left out (default), or encrypted in the file",
    )
    export.add_argument(
        "--passphrase-file", type=Path, help="with --identity encrypt (else asked on a terminal)"
    )
    export.add_argument("--force", action="store_true", help="replace FILE if it exists")
    add_output(export)
    restore = state_verbs.add_parser(
        "import", help="restore a backup on a stopped agent (free partitions come back dirty)"
    )
    restore.add_argument("file", type=Path, help="a file written by `state export`")
    restore.add_argument(
        "--identity",
        choices=("restore", "exclude"),
        default="restore",
        help="restore the node identity the file carries (default), or keep this node's",
    )
    restore.add_argument(
        "--passphrase-file", type=Path, help="for a file with identity (else asked on a terminal)"
    )
    restore.add_argument("--force", action="store_true", help="accept a backup of another node")
    add_output(restore)


def run(args: argparse.Namespace, config: Config | None = None) -> int:
    if config is None:
        config = load_config(args.config)
    if args.verb == "export":
        return export_state(args, config)
    if args.verb == "import":
        return import_state(args, config)
    return recover(config)


def identity_paths(config: Config) -> dict[str, Path]:
    """Where each identity member of a backup lives on this node."""
    from agent.identity.node_key import NODE_KEY_FILE  # noqa: PLC0415
    from agent.identity.tls import IdentityPaths  # noqa: PLC0415

    tls = IdentityPaths(config.link.cert_dir)
    return {
        "node_key": config.node.state_dir / NODE_KEY_FILE,
        "tls_key": tls.key,
        "tls_certificate": tls.certificate,
        "ca": config.link.cert_dir / "ca.pem",  # the pinned CA, whatever ca_file overrides
        "command_key": tls.command_key,
        "enrollment": tls.enrollment,
    }


def _node_public_key(config: Config) -> str | None:
    """This node's public key (PEM), or None where it has no node key yet."""
    from agent.identity.node_key import NodeKey  # noqa: PLC0415

    path = identity_paths(config)["node_key"]
    if not (path.exists() or path.is_symlink()):
        return None
    return NodeKey.load(path).public_pem()


def _passphrase(args: argparse.Namespace, *, confirm: bool, what: str, hint: str = "") -> bytes:
    from agent.runtime.inputs import read_bounded  # noqa: PLC0415

    if args.passphrase_file is not None:
        data = read_bounded(args.passphrase_file, _MAX_PASSPHRASE_BYTES, "passphrase file")
        text = data.removesuffix(b"\n").removesuffix(b"\r")
    elif sys.stdin.isatty():
        text = getpass.getpass(f"passphrase ({what}): ").encode()
        if confirm and getpass.getpass("again: ").encode() != text:
            raise ValidationError("the passphrases differ: nothing was written")
    else:
        raise ValidationError(
            f"{what} needs a passphrase: --passphrase-file FILE, or run on a terminal{hint}"
        )
    if not text:
        raise ValidationError("the passphrase is empty")
    return text


# -- export ---------------------------------------------------------------------------------------


def export_state(args: argparse.Namespace, config: Config) -> int:
    """Write a backup; works while the agent runs (SQLite's online backup, no lock taken)."""
    from agent import __version__  # noqa: PLC0415
    from agent.identity.files import read_private  # noqa: PLC0415
    from agent.store.backup import MIN_PASSPHRASE_CHARS, export_state, utc  # noqa: PLC0415

    out: Path = args.file
    if (out.exists() or out.is_symlink()) and not args.force:
        raise ValidationError(f"{out} exists: pass --force to replace it")
    public = _node_public_key(config)
    identity: dict[str, bytes] | None = None
    passphrase: bytes | None = None
    if args.identity == "encrypt":
        if public is None:
            raise ValidationError(
                f"no node key at {identity_paths(config)['node_key']}: no identity to export"
            )
        identity = {
            name: read_private(path, f"identity file ({name})")
            for name, path in identity_paths(config).items()
            if path.exists() or path.is_symlink()
        }
        passphrase = _passphrase(args, confirm=True, what="encrypting the node identity")
        if len(passphrase.decode(errors="replace")) < MIN_PASSPHRASE_CHARS:
            raise ValidationError(
                f"the passphrase must have at least {MIN_PASSPHRASE_CHARS} characters"
            )
    elif args.passphrase_file is not None:
        raise ValidationError("--passphrase-file goes with --identity encrypt")
    manifest = export_state(
        config.node.store_path, out, node_id=config.node.id, node_public_key=public or "",
        agent_version=__version__, identity=identity, passphrase=passphrase, force=args.force,
    )  # fmt: skip
    members = sorted(identity) if identity else []
    if args.json:
        print_json({"file": str(out), "manifest": manifest.to_json(), "identity": members})
        return int(ExitCode.OK)
    print(
        f"wrote {out}: node {manifest.node_id}, journal schema {manifest.journal_schema_version} "
        f"({manifest.journal_size} bytes, {manifest.partitions} partitions, "
        f"{manifest.live_leases} live leases, {manifest.certificates} scrub certificates) "
        f"as of {utc(manifest.exported_at)}"
    )
    print(
        f"identity encrypted in the file: {', '.join(members)}"
        if members
        else "identity not in the file (--identity encrypt to include it)"
    )
    return int(ExitCode.OK)


# -- import ---------------------------------------------------------------------------------------


def import_state(
    args: argparse.Namespace,
    config: Config,
    after_step: Callable[[str], None] | None = None,
) -> int:
    """Restore a backup under the agent's own lock; ``after_step`` is the crash tests' hook."""
    from agent.runtime.statedir import StateDirLock  # noqa: PLC0415
    from agent.store import backup, restore  # noqa: PLC0415

    state_dir = config.node.state_dir
    paths = identity_paths(config)
    lock = StateDirLock(state_dir)
    lock.acquire("import")
    try:
        restore.remove_leftovers(sorted({state_dir, *(p.parent for p in paths.values())}))
        checked = restore.open_backup(args.file, state_dir)
        try:
            manifest = checked.manifest
            matched = restore.check_node(
                manifest, args.file, config.node.id, _node_public_key(config), force=args.force
            )
            identity: dict[Path, bytes] | None = None
            if manifest.identity is not None and args.identity == "restore":
                hint = "; --identity exclude restores the journal only"
                passphrase = _passphrase(
                    args, confirm=False, what="the node identity in this file", hint=hint
                )
                files = checked.open_identity(passphrase)
                identity = {paths[name]: data for name, data in files.items()}
            now = time.time()
            restored = restore.prepare_journal(checked, now)
            aside = state_dir / f"pre-import-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
            kept = restore.install(
                checked, config.node.store_path, identity, list(paths.values()), aside, after_step
            )
        finally:
            checked.discard()
    finally:
        lock.release()
    names = sorted(name for name, path in paths.items() if identity and path in identity)
    if args.json:
        print_json({
            "file": str(args.file), "manifest": manifest.to_json(), "node": matched,
            "marked_dirty": restored.marked_dirty, "live_leases": restored.live_leases,
            "outbox_kept": restored.outbox_kept, "outbox_dropped": restored.outbox_dropped,
            "epoch_changed": restored.new_epoch is not None, "identity_restored": names,
            "kept": [str(path) for path in kept],
        })  # fmt: skip
        return int(ExitCode.OK)
    print(
        f"restored {args.file} ({matched}): node {manifest.node_id}, backup of "
        f"{backup.utc(manifest.exported_at)} by agent {manifest.agent_version}, journal schema "
        f"{manifest.journal_schema_version}"
    )
    print(
        f"{restored.marked_dirty} partitions dirty (memory state unknown), "
        f"{restored.live_leases} live leases kept"
    )
    if restored.new_epoch is not None:
        print(
            f"link outbox: new epoch; {restored.outbox_kept} unacknowledged reports will be sent "
            f"again, {restored.outbox_dropped} acknowledged ones dropped"
        )
    if manifest.identity is None:
        print("identity: not in the file; this node's own is unchanged")
    else:
        print(f"identity: {'restored: ' + ', '.join(names) if identity else 'left unchanged'}")
    if kept:
        print(f"the previous state is kept in {aside}")
    print(
        "start the agent: it re-applies the fences of the live leases and scrubs every other "
        "partition before its next grant"
    )
    return int(ExitCode.OK)


# -- recover --------------------------------------------------------------------------------------


def recover(config: Config) -> int:
    """Set a damaged journal aside, under the agent's own lock (refused while it runs)."""
    from agent.runtime.statedir import StateDirLock  # noqa: PLC0415

    lock = StateDirLock(config.node.state_dir)
    lock.acquire("recovery")
    try:
        journal = config.node.store_path
        stamp = time.strftime("%Y%m%dT%H%M%S")
        moved = []
        for suffix in ("", "-wal", "-shm"):
            source = journal.with_name(journal.name + suffix)
            if source.exists():
                target = source.with_name(f"{journal.name}.damaged-{stamp}{suffix}")
                try:
                    source.rename(target)
                except OSError as error:
                    raise StoreError(f"cannot move {source} aside: {error.strerror}") from error
                moved.append(target)
    finally:
        lock.release()
    if not moved:
        print(f"no journal at {journal}: nothing to recover")
        return int(ExitCode.OK)
    for path in moved:
        print(f"kept {path}")
    print(
        "the next `accelguard agent` starts a new journal with every partition quarantined "
        "(the node's key is older than it); inspect, then `accelguard partition clear` each "
        "partition to scrub it"
    )
    return int(ExitCode.OK)
