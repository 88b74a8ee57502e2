"""The agent's SQLite journal.

WAL mode with ``synchronous=FULL``: a transition is on disk before the agent acts on it, so after
a power cut or SIGKILL the journal tells the truth about what was intended (DESIGN.md, lease
invariant 4). All SQL lives in this module; schema changes are numbered migrations applied in
order and recorded in ``PRAGMA user_version``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import StoreError

# Each entry moves the schema from version i to i+1. Never edit a released migration: append one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE partitions (
        uuid TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('gpu', 'mig')),
        gpu_uuid TEXT NOT NULL,
        gpu_index INTEGER NOT NULL,
        gi_id INTEGER,
        ci_id INTEGER,
        profile TEXT NOT NULL DEFAULT '',
        placement_start INTEGER,
        placement_size INTEGER,
        state TEXT NOT NULL
            CHECK (state IN ('free', 'leased', 'releasing', 'scrubbing', 'quarantined')),
        clean INTEGER NOT NULL CHECK (clean IN (0, 1)),
        reason TEXT NOT NULL DEFAULT '',
        present INTEGER NOT NULL DEFAULT 1,
        updated_at REAL NOT NULL
    );
    CREATE TABLE layout_journal (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        gpu_uuid TEXT NOT NULL,
        plan TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
        detail TEXT NOT NULL DEFAULT '',
        started_at REAL NOT NULL,
        finished_at REAL
    );
    """,
    """
    ALTER TABLE partitions ADD COLUMN lease_id TEXT;
    ALTER TABLE partitions ADD COLUMN last_lease_id TEXT;
    CREATE TABLE leases (
        id TEXT PRIMARY KEY,
        partition_uuid TEXT NOT NULL,
        tenant TEXT NOT NULL,
        cgroup TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('granting', 'active', 'releasing', 'released')),
        created_at REAL NOT NULL,
        expires_at REAL,
        released_at REAL,
        release_reason TEXT NOT NULL DEFAULT ''
    );
    -- Invariant: a partition has at most one live lease.
    CREATE UNIQUE INDEX leases_one_live_per_partition
        ON leases (partition_uuid) WHERE state != 'released';
    CREATE TABLE scrubs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        partition_uuid TEXT NOT NULL,
        lease_id TEXT,
        started_at REAL NOT NULL,
        finished_at REAL,
        verified INTEGER NOT NULL DEFAULT 0,
        result TEXT NOT NULL DEFAULT '{}',
        error TEXT NOT NULL DEFAULT ''
    );
    """,
    """
    ALTER TABLE leases ADD COLUMN scrub_policy TEXT NOT NULL DEFAULT '';
    CREATE TABLE certificates (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        partition_uuid TEXT NOT NULL,
        lease_id TEXT,
        verified INTEGER NOT NULL,
        issued_at REAL NOT NULL,
        document TEXT NOT NULL
    );
    """,
)


@dataclass(frozen=True)
class PartitionRecord:
    uuid: str
    kind: str
    gpu_uuid: str
    gpu_index: int
    gi_id: int | None
    ci_id: int | None
    profile: str
    placement_start: int | None
    placement_size: int | None
    state: str
    clean: bool
    reason: str
    present: bool
    updated_at: float
    lease_id: str | None = None
    last_lease_id: str | None = None


@dataclass(frozen=True)
class LeaseRecord:
    id: str
    partition_uuid: str
    tenant: str
    cgroup: str
    state: str
    created_at: float
    expires_at: float | None
    released_at: float | None
    release_reason: str
    scrub_policy: str = ""


@dataclass(frozen=True)
class LayoutJournalEntry:
    id: int
    gpu_uuid: str
    plan: dict[str, Any]
    status: str
    detail: str
    started_at: float
    finished_at: float | None


class Store:
    """One SQLite connection, used from one thread at a time (the daemon's blocking executor)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            path.chmod(0o600)
            self._migrate()
        except (sqlite3.Error, OSError) as error:
            raise StoreError(f"cannot open the journal at {path}: {error}") from error

    def close(self) -> None:
        self._db.close()

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        current = self.schema_version
        if current > len(MIGRATIONS):
            raise StoreError(
                f"journal {self.path} has schema version {current}, newer than this agent "
                f"knows ({len(MIGRATIONS)}): upgrade the agent or restore a matching backup"
            )
        for version in range(current, len(MIGRATIONS)):
            # executescript commits first; wrap the DDL and the version bump in one transaction.
            script = MIGRATIONS[version]
            self._db.executescript(
                f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {version + 1};\nCOMMIT;"
            )

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as error:
            raise StoreError(f"journal write failed: {error}") from error

    # -- meta -----------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # -- partitions -----------------------------------------------------------------------------

    def partitions(self, *, present_only: bool = True) -> list[PartitionRecord]:
        query = "SELECT * FROM partitions"
        if present_only:
            query += " WHERE present = 1"
        rows = self._db.execute(query + " ORDER BY gpu_index, gi_id, ci_id, uuid").fetchall()
        return [_partition(row) for row in rows]

    def partition(self, uuid: str) -> PartitionRecord | None:
        row = self._db.execute("SELECT * FROM partitions WHERE uuid = ?", (uuid,)).fetchone()
        return None if row is None else _partition(row)

    def sync_partitions(self, seen: Sequence[PartitionRecord]) -> list[str]:
        """Record what the hardware shows now. Returns the UUIDs that were new to the journal.

        A partition the journal has never seen starts dirty (DESIGN.md invariant 4: unknown means
        unsafe); one that disappeared is kept as ``present = 0`` so its history is not lost.
        """
        new: list[str] = []
        now = time.time()
        with self.transaction() as db:
            known = {row["uuid"] for row in db.execute("SELECT uuid FROM partitions")}
            seen_ids = {p.uuid for p in seen}
            for part in seen:
                if part.uuid not in known:
                    new.append(part.uuid)
                    db.execute(
                        "INSERT INTO partitions (uuid, kind, gpu_uuid, gpu_index, gi_id, ci_id, "
                        "profile, placement_start, placement_size, state, clean, reason, present, "
                        "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?)",
                        (
                            part.uuid, part.kind, part.gpu_uuid, part.gpu_index, part.gi_id,
                            part.ci_id, part.profile, part.placement_start, part.placement_size,
                            part.state, int(part.clean), part.reason, now,
                        ),
                    )  # fmt: skip
                else:
                    db.execute(
                        "UPDATE partitions SET gpu_index = ?, present = 1 WHERE uuid = ?",
                        (part.gpu_index, part.uuid),
                    )
            for uuid in known - seen_ids:
                db.execute(
                    "UPDATE partitions SET present = 0, updated_at = ? "
                    "WHERE uuid = ? AND present = 1",
                    (now, uuid),
                )
        return new

    def set_partition_state(
        self, uuid: str, state: str, *, clean: bool | None = None, reason: str | None = None
    ) -> None:
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE partitions SET state = ?, clean = COALESCE(?, clean), "
                "reason = COALESCE(?, reason), updated_at = ? WHERE uuid = ?",
                (state, None if clean is None else int(clean), reason, time.time(), uuid),
            )
            if cursor.rowcount != 1:
                raise StoreError(f"partition {uuid} is not in the journal")

    # -- leases -----------------------------------------------------------------------------------

    def lease(self, lease_id: str) -> LeaseRecord | None:
        row = self._db.execute("SELECT * FROM leases WHERE id = ?", (lease_id,)).fetchone()
        return None if row is None else _lease(row)

    def leases(self, *, live_only: bool = False) -> list[LeaseRecord]:
        query = "SELECT * FROM leases"
        if live_only:
            query += " WHERE state != 'released'"
        return [_lease(r) for r in self._db.execute(query + " ORDER BY created_at, id")]

    def begin_grant(
        self,
        lease_id: str,
        partition_uuid: str,
        tenant: str,
        cgroup: str,
        expires_at: float | None,
        scrub_policy: str = "",
    ) -> bool:
        """Atomically take a free, clean partition for a new lease. False if it is not (any more).

        The partition is dirty from this moment: the tenant may write to it (invariant 2).
        """
        now = time.time()
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE partitions SET state = 'leased', clean = 0, lease_id = ?, reason = '', "
                "updated_at = ? WHERE uuid = ? AND state = 'free' AND clean = 1 AND present = 1",
                (lease_id, now, partition_uuid),
            )
            if cursor.rowcount != 1:
                return False
            db.execute(
                "INSERT INTO leases (id, partition_uuid, tenant, cgroup, state, created_at, "
                "expires_at, scrub_policy) VALUES (?, ?, ?, ?, 'granting', ?, ?, ?)",
                (lease_id, partition_uuid, tenant, cgroup, now, expires_at, scrub_policy),
            )
        return True

    def set_lease_state(self, lease_id: str, state: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE leases SET state = ? WHERE id = ?", (state, lease_id))

    def begin_release(self, lease_id: str, reason: str) -> None:
        with self.transaction() as db:
            row = db.execute(
                "SELECT partition_uuid FROM leases WHERE id = ?", (lease_id,)
            ).fetchone()
            if row is None:
                raise StoreError(f"lease {lease_id} is not in the journal")
            db.execute(
                "UPDATE leases SET state = 'releasing', release_reason = ? WHERE id = ?",
                (reason, lease_id),
            )
            db.execute(
                "UPDATE partitions SET state = 'releasing', clean = 0, updated_at = ? "
                "WHERE uuid = ? AND lease_id = ?",
                (time.time(), row["partition_uuid"], lease_id),
            )

    def finish_release(self, lease_id: str) -> None:
        """The lease is over: the partition no longer names it as holder."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT partition_uuid FROM leases WHERE id = ?", (lease_id,)
            ).fetchone()
            db.execute(
                "UPDATE leases SET state = 'released', released_at = ? WHERE id = ?",
                (time.time(), lease_id),
            )
            if row is not None:
                db.execute(
                    "UPDATE partitions SET lease_id = NULL, last_lease_id = ? "
                    "WHERE uuid = ? AND lease_id = ?",
                    (lease_id, row["partition_uuid"], lease_id),
                )

    # -- scrubs -----------------------------------------------------------------------------------

    def record_scrub(
        self,
        partition_uuid: str,
        lease_id: str | None,
        started_at: float,
        finished_at: float,
        verified: bool,
        result: dict[str, Any],
        error: str,
    ) -> int:
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO scrubs (partition_uuid, lease_id, started_at, finished_at, verified, "
                "result, error) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (partition_uuid, lease_id, started_at, finished_at, int(verified),
                 json.dumps(result, sort_keys=True), error),
            )  # fmt: skip
            return int(cursor.lastrowid or 0)

    # -- scrub certificates ------------------------------------------------------------------

    def add_certificate(
        self, partition_uuid: str, lease_id: str | None, verified: bool, document: dict[str, Any]
    ) -> int:
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO certificates (partition_uuid, lease_id, verified, issued_at, "
                "document) VALUES (?, ?, ?, ?, ?)",
                (partition_uuid, lease_id, int(verified), time.time(), json.dumps(document)),
            )
            return int(cursor.lastrowid or 0)

    def certificates(self, partition_uuid: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT document FROM certificates"
        args: tuple[str, ...] = ()
        if partition_uuid:
            query += " WHERE partition_uuid = ?"
            args = (partition_uuid,)
        rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        return [json.loads(row["document"]) for row in rows]

    # -- layout journal -------------------------------------------------------------------------

    def begin_layout(self, gpu_uuid: str, plan: dict[str, Any]) -> int:
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO layout_journal (gpu_uuid, plan, status, started_at) "
                "VALUES (?, ?, 'running', ?)",
                (gpu_uuid, json.dumps(plan, sort_keys=True), time.time()),
            )
            return int(cursor.lastrowid or 0)

    def finish_layout(self, entry_id: int, status: str, detail: str = "") -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE layout_journal SET status = ?, detail = ?, finished_at = ? WHERE id = ?",
                (status, detail, time.time(), entry_id),
            )

    def unfinished_layouts(self) -> list[LayoutJournalEntry]:
        rows = self._db.execute(
            "SELECT * FROM layout_journal WHERE status = 'running' ORDER BY id"
        ).fetchall()
        return [
            LayoutJournalEntry(
                id=row["id"],
                gpu_uuid=row["gpu_uuid"],
                plan=json.loads(row["plan"]),
                status=row["status"],
                detail=row["detail"],
                started_at=row["started_at"],
                finished_at=row["finished_at"],
            )
            for row in rows
        ]


def _partition(row: sqlite3.Row) -> PartitionRecord:
    return PartitionRecord(
        uuid=row["uuid"],
        kind=row["kind"],
        gpu_uuid=row["gpu_uuid"],
        gpu_index=row["gpu_index"],
        gi_id=row["gi_id"],
        ci_id=row["ci_id"],
        profile=row["profile"],
        placement_start=row["placement_start"],
        placement_size=row["placement_size"],
        state=row["state"],
        clean=bool(row["clean"]),
        reason=row["reason"],
        present=bool(row["present"]),
        updated_at=row["updated_at"],
        lease_id=row["lease_id"],
        last_lease_id=row["last_lease_id"],
    )


def _lease(row: sqlite3.Row) -> LeaseRecord:
    return LeaseRecord(
        id=row["id"],
        partition_uuid=row["partition_uuid"],
        tenant=row["tenant"],
        cgroup=row["cgroup"],
        state=row["state"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        released_at=row["released_at"],
        release_reason=row["release_reason"],
        scrub_policy=row["scrub_policy"],
    )
