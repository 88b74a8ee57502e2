"""``accelguard audit verify|show|export``: the node's audit log (docs/audit.md).

These read the journal file directly (read-only for verify and show), so they answer with the
agent stopped too; they need the journal's owner (root). ``audit export`` writes every record
and checkpoint to a file and marks the exported checkpoints, which lets rotation remove the
records they cover on a node without a controller.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.cli.output import add_output, print_json, rfc3339
from agent.config import Config, load_config
from agent.errors import (
    AccelguardError,
    AuditTamperedError,
    ExitCode,
    StoreError,
    ValidationError,
)
from agent.runtime.durations import parse_duration


def add_parsers(commands: argparse._SubParsersAction[Any]) -> None:
    group = commands.add_parser("audit", help="the tamper-evident audit log")
    verbs = group.add_subparsers(dest="verb", required=True)
    verify = verbs.add_parser("verify", help="recompute the chain and check every checkpoint")
    verify.add_argument("--from", dest="from_seq", type=int, default=0, metavar="SEQ",
                        help="start at record SEQ (trusting the one before it)")  # fmt: skip
    verify.add_argument("--checkpoints", type=Path, metavar="FILE",
                        help="the controller's checkpoints of this node "
                        "(`accelguard controller audit checkpoints --node ID --json`)")  # fmt: skip
    verify.add_argument("--public-key", type=Path, metavar="PEM",
                        help="the node's public key PEM (default: this node's key)")  # fmt: skip
    add_output(verify)
    show = verbs.add_parser("show", help="who did what, when")
    show.add_argument("--lease", help="only records of this lease")
    show.add_argument("--partition", help="only records of this partition (UUID)")
    show.add_argument("--since", help="ISO 8601 time, Unix seconds, or an age such as 2h, 3d")
    show.add_argument("--limit", type=int, default=0, help="at most this many (the newest)")
    add_output(show)
    export = verbs.add_parser("export", help="write records and checkpoints to FILE (JSON lines)")
    export.add_argument("file", type=Path)


def run(args: argparse.Namespace, config: Config | None = None) -> int:
    if config is None:
        config = load_config(args.config)
    if args.verb == "verify":
        return _verify(args, config)
    if args.verb == "show":
        return _show(args, config)
    return _export(args, config)


@contextmanager
def _journal(config: Config, *, write: bool = False) -> Iterator[sqlite3.Connection]:
    path = config.node.store_path
    if not path.exists():
        raise StoreError(f"no journal at {path}: nothing to read")
    try:
        db = sqlite3.connect(
            f"file:{path}?mode={'rw' if write else 'ro'}", uri=True, isolation_level=None
        )
        db.execute("PRAGMA busy_timeout=5000")
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    except sqlite3.Error as error:
        raise StoreError(f"cannot read the journal at {path}: {error}") from error
    if "audit_log" not in tables:
        db.close()
        raise StoreError(f"the journal at {path} has no audit log yet (start the agent once)")
    try:
        yield db
    finally:
        db.close()


def _public_key(args: argparse.Namespace, config: Config) -> Ed25519PublicKey:
    """``--public-key``, or this node's own key from its state directory."""
    from agent.identity.node_key import NODE_KEY_FILE, NodeKey  # noqa: PLC0415
    from agent.runtime.inputs import read_bounded  # noqa: PLC0415

    if args.public_key is None:
        path = config.node.state_dir / NODE_KEY_FILE
        try:
            return NodeKey.load(path).public_key()
        except AccelguardError as error:
            raise ValidationError(
                f"no key to verify against ({error}); pass --public-key FILE with the node's "
                "public key (`accelguard status` prints it)"
            ) from error
    raw = read_bounded(args.public_key, 4096, "public key")
    try:
        key = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise ValidationError(f"--public-key {args.public_key}: not a PEM public key") from error
    if not isinstance(key, Ed25519PublicKey):
        raise ValidationError(f"--public-key {args.public_key}: not an Ed25519 key")
    return key


def _verify(args: argparse.Namespace, config: Config) -> int:
    from agent.audit.verify import load_checkpoints_file, verify  # noqa: PLC0415

    external = []
    if args.checkpoints is not None:
        try:
            data = args.checkpoints.read_bytes()
        except OSError as error:
            raise ValidationError(f"--checkpoints {args.checkpoints}: {error.strerror}") from None
        external = load_checkpoints_file(data, config.node.id)
    key = _public_key(args, config)
    with _journal(config) as db:
        try:
            report = verify(db, key, config.node.id, from_seq=args.from_seq, external=external)
        except sqlite3.Error as error:
            raise StoreError(f"cannot read the audit log: {error}") from error
    if args.json:
        print_json(report.to_dict())
        return int(ExitCode.OK if report.ok else ExitCode.FAILED)
    first = report.first()
    if first is not None:
        for finding in sorted(report.findings, key=lambda f: f.seq)[1:]:
            print(f"also: {finding.message}")
        raise AuditTamperedError(f"audit log tampered: {first.message}")
    print(
        f"audit log intact: records {report.first_seq} to {report.last_seq} "
        f"({report.records}), {report.checkpoints} "
        f"checkpoint{'' if report.checkpoints == 1 else 's'} signed by this node's key"
    )
    return int(ExitCode.OK)


def parse_since(text: str, now: float | None = None) -> float:
    """ISO 8601 (naive means UTC), Unix seconds, or an age: 90s, 15m, 2h, 3d."""
    now = time.time() if now is None else now
    value = text.strip()
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return now - parse_duration(value)
    except ValueError:
        pass
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ValidationError(
            f"--since {text[:64]!r}: expected an ISO 8601 time, Unix seconds or an age (2h, 3d)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()


def _show(args: argparse.Namespace, config: Config) -> int:
    from agent.store import audit  # noqa: PLC0415

    since = parse_since(args.since) if args.since else None
    if args.limit < 0:
        raise ValidationError("--limit: must be 0 (all) or more")
    with _journal(config) as db:
        found = list(
            audit.records(db, lease_id=args.lease, partition_uuid=args.partition, since=since)
        )
    if args.limit:
        found = found[-args.limit :]
    if args.json:
        # The hash covers the exact float; the export (audit export) keeps it, this view is for
        # people and scripts: RFC 3339 like every other time the CLI prints.
        print_json({"records": [{**r.to_dict(), "at": rfc3339(r.at)} for r in found]})
        return int(ExitCode.OK)
    for record in found:
        print(_line(record.to_dict()))
    if not found:
        print("no audit records match", file=sys.stderr)
    return int(ExitCode.OK)


def _line(record: dict[str, Any]) -> str:
    when = datetime.datetime.fromtimestamp(record["at"], datetime.UTC)
    actor = record["actor"]
    who = actor["kind"]
    if "uid" in actor:
        who += f" uid={actor['uid']} pid={actor.get('pid')}"
    if "command_id" in actor:
        who += f" command={actor['command_id'][:16]} key={str(actor.get('key_id'))[:16]}"
    subject = " ".join(
        f"{name}={record[key]}" for key, name in (("lease_id", "lease"),
                                                  ("partition_uuid", "partition")) if record[key]
    )  # fmt: skip
    detail = json.dumps(record["detail"], sort_keys=True) if record["detail"] else ""
    return (
        f"{record['seq']:>8} {when:%Y-%m-%dT%H:%M:%S}Z {record['action']} {record['outcome']} "
        f"[{who}] {subject} {detail}"
    ).rstrip()


def _export(args: argparse.Namespace, config: Config) -> int:
    from agent.store import audit  # noqa: PLC0415

    target: Path = args.file
    if target.exists():
        raise ValidationError(f"{target} exists: audit export never overwrites a file")
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with _journal(config, write=True) as db:
        # One read transaction (a snapshot: the agent keeps writing meanwhile, never blocked),
        # then a short write that marks what the file holds.
        db.execute("BEGIN")
        try:
            anchor_seq, anchor_hash = audit.anchor(db)
            checkpoints = audit.checkpoints(db)
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8") as out:
                header = {"node": config.node.id, "exported_at": time.time(),
                          "anchor": {"seq": anchor_seq, "hash": anchor_hash.hex()}}  # fmt: skip
                out.write(json.dumps({"header": header}) + "\n")
                count = 0
                for record in audit.records(db):
                    out.write(json.dumps({"record": record.to_dict()}) + "\n")
                    count += 1
                for checkpoint in checkpoints:
                    out.write(json.dumps({"checkpoint": checkpoint.to_dict()}) + "\n")
                out.flush()
                os.fsync(out.fileno())
            db.execute("COMMIT")
            temporary.rename(target)
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            temporary.unlink(missing_ok=True)
            raise
        covered = max((c.seq for c in checkpoints), default=0)
        db.execute("BEGIN IMMEDIATE")
        audit.mark_exported(db, covered)
        db.execute("COMMIT")
    print(
        f"exported {count} records and {len(checkpoints)} checkpoints to {target}; records up "
        f"to {covered} may now be rotated away"
    )
    return int(ExitCode.OK)
