"""The audit log's rows (migration 8): appended in the same journal transaction as the action
they record, so an action and its record can never disagree after a crash.

Each row names who acted (:class:`Actor`, from the context of the call: an admin caller's
``SO_PEERCRED`` identity, a remote command's id and signing key, or the agent itself), what was
done and how it ended, and carries ``prev_hash`` (the row before it) and ``hash``:

    hash = SHA-256(prev_hash || content)

where ``content`` is the canonical JSON of ``[seq, at, actor, action, outcome, lease_id,
partition_uuid, detail]`` (:func:`content_bytes`). The first row follows :data:`GENESIS`, or the
anchor left by rotation (``meta`` keys ``audit_anchor_seq``/``audit_anchor_hash``: the last row
removed). Checkpoints (signed by agent/audit/checkpoint.py) are kept in ``audit_checkpoints``.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Final, Literal

GENESIS: Final = bytes(32)
ANCHOR_SEQ_KEY: Final = "audit_anchor_seq"
ANCHOR_HASH_KEY: Final = "audit_anchor_hash"

ActorKind = Literal["agent", "admin", "controller", "operator"]


@dataclass(frozen=True)
class Actor:
    """Who an action is done for. ``agent``: the daemon on its own (a timer, a reconcile, start
    and stop); ``admin``: a caller of the admin socket (uid, gid, pid from the kernel);
    ``controller``: a signed remote command (its id and the key that signed it);
    ``operator``: a command run on the node that works on the state directory itself."""

    kind: ActorKind
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    command_id: str | None = None
    key_id: str | None = None

    def to_json(self) -> str:
        return _actor_json(self)

    def describe(self) -> str:
        if self.kind == "admin":
            return f"admin uid {self.uid} pid {self.pid}"
        if self.kind == "controller":
            return f"controller command {self.command_id} (key {self.key_id})"
        if self.kind == "operator":
            return f"operator uid {self.uid} pid {self.pid}"
        return "agent"


@functools.lru_cache(maxsize=1024)
def _actor_json(actor: Actor) -> str:
    """An actor's JSON, kept per actor (every audit record names one; asdict's deep copy cost
    each record tens of µs)."""
    present = {field.name: getattr(actor, field.name) for field in fields(actor)}
    return canonical_json({key: value for key, value in present.items() if value is not None})


AGENT: Final = Actor("agent")
_ACTOR: contextvars.ContextVar[Actor] = contextvars.ContextVar("audit_actor", default=AGENT)


def current_actor() -> Actor:
    return _ACTOR.get()


@contextmanager
def acting_as(actor: Actor) -> Iterator[None]:
    """Every record written in this context (and in blocking calls it makes through the
    daemon's executor, which copies the context) names ``actor``."""
    token = _ACTOR.set(actor)
    try:
        yield
    finally:
        _ACTOR.reset(token)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    at: float
    actor: str
    action: str
    outcome: str
    lease_id: str | None
    partition_uuid: str | None
    detail: str
    prev_hash: bytes
    hash: bytes

    def content(self) -> bytes:
        return content_bytes(
            self.seq, self.at, self.actor, self.action, self.outcome, self.lease_id,
            self.partition_uuid, self.detail,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "actor": json.loads(self.actor),
            "action": self.action,
            "outcome": self.outcome,
            "lease_id": self.lease_id,
            "partition_uuid": self.partition_uuid,
            "detail": json.loads(self.detail),
            "prev_hash": self.prev_hash.hex(),
            "hash": self.hash.hex(),
        }


def content_bytes(
    seq: int,
    at: float,
    actor: str,
    action: str,
    outcome: str,
    lease_id: str | None,
    partition_uuid: str | None,
    detail: str,
) -> bytes:
    return canonical_json(
        [seq, at, actor, action, outcome, lease_id, partition_uuid, detail]
    ).encode()


def chain_hash(prev_hash: bytes, content: bytes) -> bytes:
    return hashlib.sha256(prev_hash + content).digest()


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    head_hash: bytes
    at: float
    prev_seq: int
    prev_hash: bytes
    key_id: str
    signature: bytes
    report_seq: int | None = None
    acked_at: float | None = None
    exported_at: float | None = None

    def signed_dict(self) -> dict[str, Any]:
        """What was signed, as the checkpoints file of ``audit verify --checkpoints`` has it."""
        return {
            "seq": self.seq,
            "head_hash": self.head_hash.hex(),
            "at": self.at,
            "prev_seq": self.prev_seq,
            "prev_hash": self.prev_hash.hex(),
            "key_id": self.key_id,
            "signature": self.signature.hex(),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.signed_dict(), "acked_at": self.acked_at, "exported_at": self.exported_at}


# -- writing ---------------------------------------------------------------------------------


def anchor(db: sqlite3.Connection) -> tuple[int, bytes]:
    """(seq, hash) the first kept row follows: the last row rotated away, or (0, GENESIS)."""
    rows = dict(
        db.execute(
            "SELECT key, value FROM meta WHERE key IN (?, ?)", (ANCHOR_SEQ_KEY, ANCHOR_HASH_KEY)
        ).fetchall()
    )
    if ANCHOR_SEQ_KEY not in rows:
        return 0, GENESIS
    return int(rows[ANCHOR_SEQ_KEY]), bytes.fromhex(rows[ANCHOR_HASH_KEY])


def head(db: sqlite3.Connection) -> tuple[int, bytes]:
    """(seq, hash) of the newest record, or the anchor when the log is empty."""
    row = db.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    if row is None:
        return anchor(db)
    return int(row[0]), bytes(row[1])


# Off only where config audit.enabled is false (bench audit's baseline; docs/audit.md).
_enabled = True


def set_enabled(enabled: bool) -> None:
    global _enabled  # noqa: PLW0603 - one process, one journal: the daemon's setting
    _enabled = enabled


def append(
    db: sqlite3.Connection,
    action: str,
    *,
    outcome: str = "ok",
    lease_id: str | None = None,
    partition_uuid: str | None = None,
    detail: Mapping[str, Any] | None = None,
    actor: Actor | None = None,
) -> int:
    """Append one record inside the caller's open write transaction; its seq (0: disabled)."""
    if not _enabled:
        return 0
    last_seq, last_hash = head(db)
    seq = last_seq + 1
    at = time.time()
    who = (actor or _ACTOR.get()).to_json()
    text = canonical_json(dict(detail or {}))
    digest = chain_hash(
        last_hash, content_bytes(seq, at, who, action, outcome, lease_id, partition_uuid, text)
    )
    db.execute(
        "INSERT INTO audit_log (seq, at, actor, action, outcome, lease_id, partition_uuid, "
        "detail, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (seq, at, who, action, outcome, lease_id, partition_uuid, text, last_hash, digest),
    )
    return seq


def add_checkpoint(db: sqlite3.Connection, checkpoint: Checkpoint) -> None:
    db.execute(
        "INSERT INTO audit_checkpoints (seq, head_hash, at, prev_seq, prev_hash, key_id, "
        "signature, report_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            checkpoint.seq, checkpoint.head_hash, checkpoint.at, checkpoint.prev_seq,
            checkpoint.prev_hash, checkpoint.key_id, checkpoint.signature, checkpoint.report_seq,
        ),
    )  # fmt: skip


def ack_checkpoints(db: sqlite3.Connection, through_report_seq: int) -> int:
    """Mark the checkpoints whose reports the controller acked (``seq`` <= the outbox's)."""
    return db.execute(
        "UPDATE audit_checkpoints SET acked_at = ? WHERE acked_at IS NULL "
        "AND report_seq IS NOT NULL AND report_seq <= ?",
        (time.time(), through_report_seq),
    ).rowcount


def mark_exported(db: sqlite3.Connection, through_seq: int) -> int:
    return db.execute(
        "UPDATE audit_checkpoints SET exported_at = ? WHERE exported_at IS NULL AND seq <= ?",
        (time.time(), through_seq),
    ).rowcount


def shipped_seq(db: sqlite3.Connection) -> int:
    """The newest seq a checkpoint the controller acked (or an export holds) covers: the rows
    up to it may be rotated away; 0 when none."""
    row = db.execute(
        "SELECT MAX(seq) FROM audit_checkpoints WHERE acked_at IS NOT NULL "
        "OR exported_at IS NOT NULL"
    ).fetchone()
    return int(row[0] or 0)


def unshipped(db: sqlite3.Connection) -> int:
    """Records no acked or exported checkpoint covers (they may not be rotated away)."""
    return head(db)[0] - max(anchor(db)[0], shipped_seq(db))


def rotate(db: sqlite3.Connection, *, keep_records: int, keep_after: float) -> int:
    """Remove the oldest rows beyond ``keep_records`` or older than ``keep_after`` (a time), but
    never a row that no acked or exported checkpoint covers; the anchor moves to the last row
    removed. The number of rows removed."""
    shipped = shipped_seq(db)
    if shipped == 0:
        return 0
    newest = head(db)[0]
    by_count = newest - keep_records
    row = db.execute("SELECT MAX(seq) FROM audit_log WHERE at < ?", (keep_after,)).fetchone()
    by_age = int(row[0] or 0)
    through = min(shipped, max(by_count, by_age))
    first = db.execute("SELECT MIN(seq) FROM audit_log").fetchone()[0]
    if first is None or through < first:
        return 0
    last = db.execute("SELECT hash FROM audit_log WHERE seq = ?", (through,)).fetchone()
    if last is None:
        return 0
    removed = db.execute("DELETE FROM audit_log WHERE seq <= ?", (through,)).rowcount
    for key, value in ((ANCHOR_SEQ_KEY, str(through)), (ANCHOR_HASH_KEY, bytes(last[0]).hex())):
        db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )
    # Checkpoints older than the anchor's stay until a newer acked one exists: keep the newest
    # covered one (it vouches for the anchor) and everything after it.
    db.execute(
        "DELETE FROM audit_checkpoints WHERE seq < (SELECT MAX(seq) FROM audit_checkpoints "
        "WHERE seq <= ? AND (acked_at IS NOT NULL OR exported_at IS NOT NULL))",
        (through,),
    )
    return int(removed)


def partition_state(
    db: sqlite3.Connection, uuid: str, state: str, clean: bool | None, reason: str | None
) -> None:
    row = db.execute("SELECT lease_id FROM partitions WHERE uuid = ?", (uuid,)).fetchone()
    detail: dict[str, Any] = {}
    if clean is not None:
        detail["clean"] = clean
    if reason:
        detail["reason"] = reason
    append(
        db, "partition.state", outcome=state, partition_uuid=uuid,
        lease_id=row[0] if row else None, detail=detail,
    )  # fmt: skip


def lease_event(
    db: sqlite3.Connection,
    action: str,
    lease_id: str,
    detail: dict[str, Any] | None = None,
    *,
    outcome: str = "ok",
) -> None:
    row = db.execute("SELECT partition_uuid FROM leases WHERE id = ?", (lease_id,)).fetchone()
    append(
        db, action, outcome=outcome, lease_id=lease_id,
        partition_uuid=row[0] if row else None, detail=detail,
    )  # fmt: skip


# -- reading ---------------------------------------------------------------------------------


def _record(row: Any) -> AuditRecord:
    return AuditRecord(
        seq=int(row[0]), at=float(row[1]), actor=str(row[2]), action=str(row[3]),
        outcome=str(row[4]), lease_id=row[5], partition_uuid=row[6], detail=str(row[7]),
        prev_hash=bytes(row[8]), hash=bytes(row[9]),
    )  # fmt: skip


_COLUMNS: Final = (
    "seq, at, actor, action, outcome, lease_id, partition_uuid, detail, prev_hash, hash"
)


def records(
    db: sqlite3.Connection,
    *,
    from_seq: int = 0,
    lease_id: str | None = None,
    partition_uuid: str | None = None,
    since: float | None = None,
    limit: int | None = None,
) -> Iterator[AuditRecord]:
    """Records in seq order, filtered; an iterator (a long log is not read into memory)."""
    where = ["seq >= ?"]
    arguments: list[Any] = [from_seq]
    if lease_id is not None:
        where.append("lease_id = ?")
        arguments.append(lease_id)
    if partition_uuid is not None:
        where.append("partition_uuid = ?")
        arguments.append(partition_uuid)
    if since is not None:
        where.append("at >= ?")
        arguments.append(since)
    query = f"SELECT {_COLUMNS} FROM audit_log WHERE {' AND '.join(where)} ORDER BY seq"  # noqa: S608 - fixed fragments
    if limit is not None:
        query += " LIMIT ?"
        arguments.append(limit)
    for row in db.execute(query, arguments):
        yield _record(row)


def count(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0])


_CHECKPOINT_COLUMNS: Final = (
    "seq, head_hash, at, prev_seq, prev_hash, key_id, signature, report_seq, acked_at, exported_at"
)


def _checkpoint(row: Any) -> Checkpoint:
    return Checkpoint(
        seq=int(row[0]), head_hash=bytes(row[1]), at=float(row[2]), prev_seq=int(row[3]),
        prev_hash=bytes(row[4]), key_id=str(row[5]), signature=bytes(row[6]),
        report_seq=row[7], acked_at=row[8], exported_at=row[9],
    )  # fmt: skip


def checkpoints(db: sqlite3.Connection) -> list[Checkpoint]:
    query = f"SELECT {_CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY seq"  # noqa: S608
    return [_checkpoint(row) for row in db.execute(query)]


def last_checkpoint(db: sqlite3.Connection) -> Checkpoint | None:
    query = f"SELECT {_CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY seq DESC LIMIT 1"  # noqa: S608
    row = db.execute(query).fetchone()
    return None if row is None else _checkpoint(row)
