"""The controller's rows for remote commands and attestation, on the controller database's
connection (agent/controller/store.py opens it and creates these tables).

* ``commands``: every command signed for a node, with the exact signed bytes (re-delivered
  unchanged after a reconnect), its state and the node's result.
* ``command_refusals``: refusals the nodes reported, bounded per node.
* ``node_trust``: per node, its group, its attestation verdict, whether it is cordoned, and the
  verifier's memory (last accepted quote clock, IMA position per boot) as the JSON of
  ``agent.attest.verify.state.VerifierState``.
* ``policies``: attestation policy per node group.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from agent.errors import NotFoundError
from agent.store import write_transaction

MAX_REFUSALS_PER_NODE: Final = 200

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS commands (
    id BLOB PRIMARY KEY,
    node_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    issued_at REAL NOT NULL,
    not_after REAL NOT NULL,
    signed BLOB NOT NULL,
    state TEXT NOT NULL
        CHECK (state IN ('queued', 'sent', 'done', 'failed', 'refused', 'expired')),
    delivered INTEGER NOT NULL DEFAULT 0,
    finished_at REAL,
    result BLOB,
    context BLOB NOT NULL DEFAULT x'',
    verdict TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS commands_open ON commands (node_id, state, issued_at);
CREATE TABLE IF NOT EXISTS command_refusals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id TEXT NOT NULL,
    command_id BLOB NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS node_trust (
    node_id TEXT PRIMARY KEY,
    group_name TEXT NOT NULL DEFAULT 'default',
    trust TEXT NOT NULL DEFAULT 'unknown'
        CHECK (trust IN ('unknown', 'trusted', 'untrusted', 'unattested')),
    reasons TEXT NOT NULL DEFAULT '[]',
    cordoned INTEGER NOT NULL DEFAULT 0,
    last_attested_at REAL NOT NULL DEFAULT 0,
    verifier_state BLOB NOT NULL DEFAULT x'',
    ima_boot_id TEXT NOT NULL DEFAULT '',
    command_key_id TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS policies (
    group_name TEXT PRIMARY KEY,
    document TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""


class CommandState(StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    DONE = "done"
    FAILED = "failed"
    REFUSED = "refused"
    EXPIRED = "expired"


OPEN_STATES: Final = (CommandState.QUEUED, CommandState.SENT)


@dataclass(frozen=True)
class CommandRow:
    command_id: bytes
    node_id: str
    kind: str
    issued_at: float
    not_after: float
    signed: bytes
    state: CommandState
    delivered: bool
    finished_at: float | None
    result: bytes | None  # a serialized CommandResult
    context: bytes  # what the controller needs to judge the result (attest: nonce, selection)
    verdict: str = ""  # attest: the controller's verdict, JSON


@dataclass(frozen=True)
class TrustRecord:
    node_id: str
    group: str
    trust: str
    reasons: tuple[str, ...]
    cordoned: bool
    last_attested_at: float
    verifier_state: bytes
    ima_boot_id: str
    command_key_id: str = ""  # the command key the node pinned ('': the one at enrollment)


@dataclass(frozen=True)
class CommandOutcome:
    """What the store keeps of a CommandResult report besides the report itself."""

    command_id: bytes
    result: bytes
    ok: bool
    refusal: str
    detail: str


@dataclass(frozen=True)
class RefusalRow:
    command_id: bytes
    reason: str
    detail: str
    at: float


_COLUMNS: Final = (
    "id, node_id, kind, issued_at, not_after, signed, state, delivered, finished_at, result, "
    "context, verdict"
)


def _row(row: Any) -> CommandRow:
    return CommandRow(
        bytes(row[0]), str(row[1]), str(row[2]), float(row[3]), float(row[4]), bytes(row[5]),
        CommandState(str(row[6])), bool(row[7]), None if row[8] is None else float(row[8]),
        None if row[9] is None else bytes(row[9]), bytes(row[10]), str(row[11]),
    )  # fmt: skip


class CommandStore:
    """Runs on the controller's executor thread, like ``SqliteControllerStore``."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    # -- commands ------------------------------------------------------------------------------

    def add(self, row: CommandRow) -> None:
        with write_transaction(self._db, "controller database") as db:
            db.execute(
                f"INSERT INTO commands ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (row.command_id, row.node_id, row.kind, row.issued_at, row.not_after, row.signed,
                 row.state, int(row.delivered), row.finished_at, row.result, row.context,
                 row.verdict),
            )  # fmt: skip

    def get(self, command_id: bytes) -> CommandRow | None:
        found = self._db.execute(
            f"SELECT {_COLUMNS} FROM commands WHERE id = ?",  # noqa: S608 - constant
            (command_id,),
        ).fetchone()
        return None if found is None else _row(found)

    def open_for(self, node_id: str, now: float) -> list[CommandRow]:
        """Commands of ``node_id`` with no result that have not expired, oldest first."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM commands WHERE node_id = ? AND state IN ('queued', 'sent') "  # noqa: S608
            "AND not_after >= ? ORDER BY issued_at",
            (node_id, now),
        ).fetchall()
        return [_row(r) for r in rows]

    def mark_sent(self, command_id: bytes) -> None:
        with write_transaction(self._db, "controller database") as db:
            db.execute(
                "UPDATE commands SET state = CASE WHEN state = 'queued' THEN 'sent' ELSE state "
                "END, delivered = 1 WHERE id = ?",
                (command_id,),
            )

    def expire(self, now: float) -> list[bytes]:
        """Commands past not_after with no result become 'expired'; their ids."""
        with write_transaction(self._db, "controller database") as db:
            ids = [
                bytes(r[0])
                for r in db.execute(
                    "SELECT id FROM commands WHERE state IN ('queued', 'sent') AND not_after < ?",
                    (now,),
                )
            ]
            db.executemany(
                "UPDATE commands SET state = 'expired', finished_at = ? WHERE id = ?",
                [(now, i) for i in ids],
            )
        return ids

    def recent(self, node_id: str, limit: int) -> list[CommandRow]:
        if node_id:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM commands WHERE node_id = ? "  # noqa: S608
                "ORDER BY issued_at DESC LIMIT ?",
                (node_id, limit),
            ).fetchall()
        else:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM commands ORDER BY issued_at DESC LIMIT ?",  # noqa: S608
                (limit,),
            ).fetchall()
        return [_row(r) for r in rows]

    @staticmethod
    def record_result(db: sqlite3.Connection, node_id: str, outcome: CommandOutcome) -> None:
        """A CommandResult report, inside the report commit's transaction. The first result of
        a command is kept (a re-delivery's duplicate answer does not replace it); a refusal is
        also kept in the node's refusal log."""
        command_id, result, ok, refusal = (
            outcome.command_id, outcome.result, outcome.ok, outcome.refusal,
        )  # fmt: skip
        if refusal:
            db.execute(
                "INSERT INTO command_refusals (node_id, command_id, reason, detail, at) "
                "VALUES (?, ?, ?, ?, ?)",
                (node_id, command_id, refusal, outcome.detail, time.time()),
            )
            db.execute(
                "DELETE FROM command_refusals WHERE node_id = ? AND id <= (SELECT MAX(id) FROM "
                "command_refusals WHERE node_id = ?) - ?",
                (node_id, node_id, MAX_REFUSALS_PER_NODE),
            )
        if refusal == "replayed":
            # The node refused a re-delivery and sent the stored result of the one run.
            state = CommandState.DONE if ok else CommandState.FAILED
        elif refusal:
            state = CommandState.REFUSED
        else:
            state = CommandState.DONE if ok else CommandState.FAILED
        db.execute(
            "UPDATE commands SET state = ?, result = ?, finished_at = ? WHERE id = ? AND "
            "node_id = ? AND result IS NULL",
            (state, result, time.time(), command_id, node_id),
        )

    @staticmethod
    def holds_result(db: sqlite3.Connection, node_id: str, outcome: CommandOutcome) -> bool:
        """Whether ``outcome``'s result is the one kept for its command: its first result, or
        the same report sent again (after a lost ack), not a re-delivery's duplicate answer."""
        return (
            db.execute(
                "SELECT 1 FROM commands WHERE id = ? AND node_id = ? AND result = ?",
                (outcome.command_id, node_id, outcome.result),
            ).fetchone()
            is not None
        )

    def set_verdict(self, command_id: bytes, verdict: str) -> None:
        with write_transaction(self._db, "controller database") as db:
            db.execute("UPDATE commands SET verdict = ? WHERE id = ?", (verdict, command_id))

    def refusals(self, node_id: str, limit: int = 20) -> list[RefusalRow]:
        rows = self._db.execute(
            "SELECT command_id, reason, detail, at FROM command_refusals WHERE node_id = ? "
            "ORDER BY id DESC LIMIT ?",
            (node_id, limit),
        ).fetchall()
        return [RefusalRow(bytes(r[0]), str(r[1]), str(r[2]), float(r[3])) for r in rows]

    # -- trust ---------------------------------------------------------------------------------

    def trust(self, node_id: str) -> TrustRecord:
        row = self._db.execute(
            "SELECT node_id, group_name, trust, reasons, cordoned, last_attested_at, "
            "verifier_state, ima_boot_id, command_key_id FROM node_trust WHERE node_id = ?",
            (node_id,),
        ).fetchone()
        if row is None:
            return TrustRecord(node_id, "default", "unknown", (), False, 0.0, b"", "")
        return TrustRecord(
            str(row[0]), str(row[1]), str(row[2]), tuple(json.loads(row[3])), bool(row[4]),
            float(row[5]), bytes(row[6]), str(row[7]), str(row[8]),
        )  # fmt: skip

    def _upsert(self, db: sqlite3.Connection, node_id: str) -> None:
        db.execute("INSERT OR IGNORE INTO node_trust (node_id) VALUES (?)", (node_id,))

    def record_verdict(
        self,
        node_id: str,
        passed: bool,
        reasons: list[str],
        verifier_state: bytes | None,
        ima_boot_id: str,
    ) -> None:
        """A verification's outcome: a failure makes the node untrusted and cordoned; a pass
        makes it trusted but leaves a cordon in place (``uncordon`` is the operator's)."""
        with write_transaction(self._db, "controller database") as db:
            self._upsert(db, node_id)
            if passed:
                db.execute(
                    "UPDATE node_trust SET trust = 'trusted', reasons = '[]', "
                    "last_attested_at = ?, verifier_state = COALESCE(?, verifier_state), "
                    "ima_boot_id = ? WHERE node_id = ?",
                    (time.time(), verifier_state, ima_boot_id, node_id),
                )
            else:
                db.execute(
                    "UPDATE node_trust SET trust = 'untrusted', reasons = ?, cordoned = 1, "
                    "last_attested_at = ? WHERE node_id = ?",
                    (json.dumps(reasons), time.time(), node_id),
                )

    def set_unattested(self, node_id: str) -> None:
        with write_transaction(self._db, "controller database") as db:
            self._upsert(db, node_id)
            db.execute("UPDATE node_trust SET trust = 'unattested' WHERE node_id = ?", (node_id,))

    def set_cordoned(self, node_id: str, cordoned: bool) -> None:
        with write_transaction(self._db, "controller database") as db:
            self._upsert(db, node_id)
            db.execute(
                "UPDATE node_trust SET cordoned = ? WHERE node_id = ?", (int(cordoned), node_id)
            )

    def set_command_key(self, node_id: str, key_id: str) -> None:
        with write_transaction(self._db, "controller database") as db:
            self._upsert(db, node_id)
            db.execute(
                "UPDATE node_trust SET command_key_id = ? WHERE node_id = ?", (key_id, node_id)
            )

    def command_keys(self) -> dict[str, str]:
        """node id -> the command key id it pinned, for every enrolled node."""
        rows = self._db.execute(
            "SELECT nodes.id, COALESCE(node_trust.command_key_id, '') FROM nodes "
            "LEFT JOIN node_trust ON node_trust.node_id = nodes.id ORDER BY nodes.id"
        )
        return {str(r[0]): str(r[1]) for r in rows}

    def set_group(self, node_id: str, group: str) -> None:
        with write_transaction(self._db, "controller database") as db:
            self._upsert(db, node_id)
            db.execute("UPDATE node_trust SET group_name = ? WHERE node_id = ?", (group, node_id))

    # -- policies ------------------------------------------------------------------------------

    def set_policy(self, group: str, document: str) -> int:
        with write_transaction(self._db, "controller database") as db:
            db.execute(
                "INSERT INTO policies (group_name, document, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(group_name) DO UPDATE SET document = excluded.document, "
                "updated_at = excluded.updated_at",
                (group, document, time.time()),
            )
            row = db.execute(
                "SELECT COUNT(*) FROM node_trust WHERE group_name = ?", (group,)
            ).fetchone()
        return int(row[0])

    def policy(self, group: str) -> str | None:
        row = self._db.execute(
            "SELECT document FROM policies WHERE group_name = ?", (group,)
        ).fetchone()
        return None if row is None else str(row[0])

    def require_node(self, node_id: str) -> None:
        if self._db.execute("SELECT 1 FROM nodes WHERE id = ?", (node_id,)).fetchone() is None:
            raise NotFoundError(f"node {node_id!r} is not enrolled")
