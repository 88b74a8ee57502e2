"""The agent's SQLite journal (migrations in ``migrations.py``, the link's outbox in ``outbox.py``,
the audit log in ``audit.py``: all SQL lives in this package; an action's audit record is in its
transaction). WAL mode, ``synchronous=FULL``: a transition is on disk before the agent acts on it
(DESIGN.md, lease invariant 4). What no action follows skips the fsync (``_unsynced``): audit
records of actions that change no row, and a lease's activation, durable against a crash at once
and a power cut from the next full commit (a lost activation is released and scrubbed at start)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import agent.store.audit as audit_log  # by full name: not this package as its own dependency
from agent.errors import AuditFullError, JournalCorruptError, StoreError
from agent.store.certificates import certificate_digest, insert_certificate
from agent.store.migrations import MIGRATIONS
from agent.store.records import (
    LIVE_LEASE_STATES,
    LayoutJournalEntry,
    LeaseRecord,
    LeaseState,
    PartitionRecord,
    PartitionState,
    SyncResult,
    lease_from_row,
    partition_from_row,
)
from agent.store.siblings import taint_unplaced_siblings

_LIVE_SQL = "(" + ", ".join(f"'{state}'" for state in LIVE_LEASE_STATES) + ")"

__all__ = [
    "LIVE_LEASE_STATES",
    "MIGRATIONS",
    "LayoutJournalEntry",
    "LeaseRecord",
    "LeaseState",
    "PartitionRecord",
    "PartitionState",
    "Store",
    "SyncResult",
    "write_transaction",
]


QUICK_CHECK_ROWS = 20


@contextmanager
def write_transaction(db: sqlite3.Connection, what: str) -> Iterator[sqlite3.Connection]:
    """One write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception); SQLite's
    errors leave as StoreError naming ``what`` ("journal", "controller database")."""
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    except sqlite3.Error as error:
        raise StoreError(f"{what} write failed: {error}") from error


def put_meta(db: sqlite3.Connection, key: str, value: str) -> None:
    """Set a meta key inside the caller's journal transaction."""
    db.execute(
        "INSERT INTO meta(key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


class Store:
    """One SQLite connection, used from one thread at a time (the daemon's blocking executor)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Whether this open created the journal (no file, an empty file, or no schema yet): the
        # daemon compares that with the node's identity to tell a first start from a lost journal.
        self.created = False
        # audit.max_records: grants refused while this many records are not shipped (None: off).
        self.audit_max_records: int | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.created = not path.exists() or path.stat().st_size == 0
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except (sqlite3.Error, OSError) as error:
            raise StoreError(f"cannot open the journal at {path}: {error}") from error
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA busy_timeout=5000")
            self._check_integrity()
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            path.chmod(0o600)
            self.created = self.created or self.schema_version == 0
            self._migrate()
            if self.get_meta("journal_created_at") is None:
                self.set_meta("journal_created_at", repr(time.time()))
        except sqlite3.OperationalError as error:
            # Locked, read-only, out of space: the journal may be fine; say what happened.
            self._db.close()
            raise StoreError(f"cannot open the journal at {path}: {error}") from error
        except sqlite3.DatabaseError as error:
            self._db.close()
            detail = " ".join(str(error).split())  # quick_check reports span lines
            raise JournalCorruptError(
                f"the journal {path} is corrupt ({detail}): the agent will not start on it; "
                "run `accelguard state recover` (it keeps the damaged file aside and starts "
                "with every partition quarantined), see docs/operations.md"
            ) from error
        except OSError as error:
            self._db.close()
            raise StoreError(f"cannot open the journal at {path}: {error}") from error

    def _check_integrity(self) -> None:
        """Refuse a damaged journal instead of acting on what it half says.

        ``quick_check`` reads every page (O(size), milliseconds for an agent's journal) and
        catches torn or overwritten pages that a plain query may not touch.
        """
        rows = self._db.execute(f"PRAGMA quick_check({QUICK_CHECK_ROWS})").fetchall()
        problems = [str(row[0]) for row in rows]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("; ".join(problems))

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

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return write_transaction(self._db, "journal")

    # -- meta -----------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            put_meta(db, key, value)

    # -- audit ----------------------------------------------------------------------------------

    def audit(self, action: str, **fields: Any) -> int:
        """One audit record (``fields``: those of audit.append) for an action that changes no
        row, in its own transaction, not fsynced (module docstring)."""
        with self._unsynced(), self.transaction() as db:
            return audit_log.append(db, action, **fields)

    @contextmanager
    def _unsynced(self) -> Iterator[None]:
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    # -- partitions -----------------------------------------------------------------------------

    def partitions(self, *, present_only: bool = True) -> list[PartitionRecord]:
        query = "SELECT * FROM partitions"
        if present_only:
            query += " WHERE present = 1"
        rows = self._db.execute(query + " ORDER BY gpu_index, gi_id, ci_id, uuid").fetchall()
        return [partition_from_row(row) for row in rows]

    def partition(self, uuid: str) -> PartitionRecord | None:
        row = self._db.execute("SELECT * FROM partitions WHERE uuid = ?", (uuid,)).fetchone()
        return None if row is None else partition_from_row(row)

    def sync_partitions(self, seen: Sequence[PartitionRecord]) -> SyncResult:
        """Record what the hardware shows now, and what changed since the last look.

        A partition the journal has never seen starts dirty (invariant 4: unknown means unsafe).
        A clean flag belongs to one partition identity (GPU UUID, mode, GI/CI ids, placement;
        invariant 6): a partition that vanished, came back or shows another identity under the
        same UUID is dirty from now on, and so are vNPUs that may sit on a vanished one's memory
        (``siblings.py``). Vanished rows are kept (``present = 0``) so their history and their
        quarantine survive. Rows of older journals (no identity) take the one they are seen with.
        """
        result, now = SyncResult(), time.time()
        with self.transaction() as db:
            query = "SELECT uuid, present, identity, state, gpu_index, kind, clean, gpu_uuid FROM"
            known = {row["uuid"]: row for row in db.execute(query + " partitions")}
            seen_ids = {p.uuid for p in seen}
            for part in seen:
                row = known.get(part.uuid)
                if row is None:
                    result.new.append(part.uuid)
                    db.execute(
                        "INSERT INTO partitions (uuid, kind, gpu_uuid, gpu_index, gi_id, ci_id, "
                        "profile, placement_start, placement_size, state, clean, reason, present, "
                        "updated_at, identity) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)",
                        (
                            part.uuid, part.kind, part.gpu_uuid, part.gpu_index, part.gi_id,
                            part.ci_id, part.profile, part.placement_start, part.placement_size,
                            part.state, int(part.clean), part.reason, now, part.identity,
                        ),
                    )  # fmt: skip
                    audit_log.append(
                        db, "partition.discovered", outcome=part.state,
                        partition_uuid=part.uuid, detail={"identity": part.identity},
                    )  # fmt: skip
                    continue
                returned = not row["present"]
                changed = bool(row["identity"]) and row["identity"] != part.identity
                if returned or changed:
                    result.changed.append(part.uuid)
                    why = "came back" if returned else "changed identity"
                    db.execute(
                        "UPDATE partitions SET kind = ?, gpu_uuid = ?, gpu_index = ?, gi_id = ?, "
                        "ci_id = ?, profile = ?, placement_start = ?, placement_size = ?, "
                        "present = 1, identity = ?, clean = 0, updated_at = ?, "
                        "reason = CASE WHEN state = 'quarantined' THEN reason ELSE ? END "
                        "WHERE uuid = ?",
                        (
                            part.kind, part.gpu_uuid, part.gpu_index, part.gi_id, part.ci_id,
                            part.profile, part.placement_start, part.placement_size,
                            part.identity, now,
                            f"partition {why} ({part.identity}): memory state unknown",
                            part.uuid,
                        ),
                    )  # fmt: skip
                    audit_log.append(
                        db, "partition.changed", outcome="dirty", partition_uuid=part.uuid,
                        detail={"why": why, "identity": part.identity},
                    )  # fmt: skip
                elif row["gpu_index"] != part.gpu_index or row["identity"] != part.identity:
                    # Only what changed is written: a refresh of unchanged hardware is read-only.
                    db.execute(
                        "UPDATE partitions SET gpu_index = ?, identity = ? WHERE uuid = ?",
                        (part.gpu_index, part.identity, part.uuid),
                    )
            for uuid, row in known.items():
                if uuid in seen_ids or not row["present"]:
                    continue
                result.vanished.append(uuid)
                db.execute(
                    "UPDATE partitions SET present = 0, clean = 0, updated_at = ?, "
                    "reason = CASE WHEN state = 'quarantined' THEN reason "
                    "ELSE 'partition vanished from the hardware' END WHERE uuid = ?",
                    (now, uuid),
                )
                audit_log.append(db, "partition.vanished", outcome="dirty", partition_uuid=uuid)
            skip = {*result.changed, *result.new}
            result.changed.extend(taint_unplaced_siblings(db, known, result.vanished, skip, now))
        return result

    def transition(
        self,
        uuid: str,
        expected: Collection[str],
        new: str,
        *,
        clean: bool | None = None,
        reason: str | None = None,
        identity: str | None = None,
    ) -> bool:
        """Compare-and-set a partition's state: False (nothing written) unless it is in one of
        the ``expected`` states (and, when ``identity`` is given, still present with that
        identity). Every state change of a partition goes through here or through the lease
        transitions below, which check their own preconditions in SQL."""
        PartitionState(new)  # raises ValueError on a state the machine does not have
        placeholders = ", ".join("?" for _ in expected)
        query = (
            "UPDATE partitions SET state = ?, clean = COALESCE(?, clean), "  # noqa: S608 - ? marks
            "reason = COALESCE(?, reason), updated_at = ? "
            f"WHERE uuid = ? AND state IN ({placeholders})"
        )
        arguments: list[object] = [
            new, None if clean is None else int(clean), reason, time.time(), uuid, *expected,
        ]  # fmt: skip
        if identity is not None:
            query += " AND present = 1 AND identity = ?"
            arguments.append(identity)
        with self.transaction() as db:
            if db.execute(query, arguments).rowcount != 1:
                return False
            audit_log.partition_state(db, uuid, new, clean, reason)
            return True

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
            audit_log.partition_state(db, uuid, state, clean, reason)

    # -- leases -----------------------------------------------------------------------------------

    def lease(self, lease_id: str) -> LeaseRecord | None:
        row = self._db.execute("SELECT * FROM leases WHERE id = ?", (lease_id,)).fetchone()
        return None if row is None else lease_from_row(row)

    def leases(self, *, live_only: bool = False) -> list[LeaseRecord]:
        query = "SELECT * FROM leases"
        if live_only:
            query += f" WHERE state IN {_LIVE_SQL}"
        return [lease_from_row(r) for r in self._db.execute(query + " ORDER BY created_at, id")]

    def begin_grant(
        self,
        lease_id: str,
        partition_uuid: str,
        tenant: str,
        cgroup: str,
        expires_at: float | None,
        scrub_policy: str = "",
        nodes: Sequence[tuple[str, int, int, str]] = (),
    ) -> bool:
        """Atomically take a free, clean partition for a new lease. False if it is not (any more).

        The partition is dirty from this moment: the tenant may write to it (invariant 2).
        """
        now = time.time()
        with self.transaction() as db:
            if self.audit_max_records is not None:
                unshipped = audit_log.unshipped(db)
                if unshipped >= self.audit_max_records:
                    raise AuditFullError(
                        f"grant refused: the audit log holds {unshipped} records that no "
                        "checkpoint acked by the controller or exported covers "
                        f"(audit.max_records = {self.audit_max_records}); rotating them would "
                        "lose history. Restore the link to the controller or run `accelguard "
                        "audit export FILE`"
                    )
            cursor = db.execute(
                "UPDATE partitions SET state = 'leased', clean = 0, lease_id = ?, reason = '', "
                "updated_at = ? WHERE uuid = ? AND state = 'free' AND clean = 1 AND present = 1",
                (lease_id, now, partition_uuid),
            )
            if cursor.rowcount != 1:
                return False
            db.execute(
                "INSERT INTO leases (id, partition_uuid, tenant, cgroup, state, created_at, "
                "expires_at, scrub_policy, nodes) VALUES (?, ?, ?, ?, 'granting', ?, ?, ?, ?)",
                (lease_id, partition_uuid, tenant, cgroup, now, expires_at, scrub_policy,
                 json.dumps([list(node) for node in nodes])),
            )  # fmt: skip
            audit_log.append(
                db, "lease.granting", lease_id=lease_id, partition_uuid=partition_uuid,
                detail={"tenant": tenant, "cgroup": cgroup, "expires_at": expires_at,
                        "scrub_policy": scrub_policy},
            )  # fmt: skip
        return True

    def activate_lease(self, lease_id: str) -> bool:
        """``granting`` to ``active`` (not fsynced: module docstring)."""
        with self._unsynced(), self.transaction() as db:
            cursor = db.execute(
                "UPDATE leases SET state = 'active' WHERE id = ? AND state = 'granting'",
                (lease_id,),
            )
            if cursor.rowcount != 1:
                return False
            audit_log.lease_event(db, "lease.active", lease_id)
            return True

    def undo_grant(self, lease_id: str, reason: str) -> None:
        """A grant that failed before the tenant could reach the partition: the lease ends and
        the partition goes back to free and clean, untouched."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT partition_uuid FROM leases WHERE id = ? AND state = 'granting'",
                (lease_id,),
            ).fetchone()
            if row is None:
                raise StoreError(f"lease {lease_id} is not being granted")
            db.execute(
                "UPDATE leases SET state = 'released', released_at = ?, release_reason = ?, "
                "outcome = 'not granted' WHERE id = ?",
                (time.time(), reason, lease_id),
            )
            db.execute(
                "UPDATE partitions SET state = 'free', clean = 1, lease_id = NULL, reason = '', "
                "updated_at = ? WHERE uuid = ? AND lease_id = ?",
                (time.time(), row["partition_uuid"], lease_id),
            )
            audit_log.lease_event(db, "lease.not_granted", lease_id, {"reason": reason})

    def begin_release(self, lease_id: str, reason: str) -> None:
        with self.transaction() as db:
            row = db.execute(
                "SELECT partition_uuid, state FROM leases WHERE id = ?", (lease_id,)
            ).fetchone()
            if row is None:
                raise StoreError(f"lease {lease_id} is not in the journal")
            if row["state"] not in LIVE_LEASE_STATES:
                raise StoreError(f"lease {lease_id} is {row['state']}, not live")
            if row["state"] != LeaseState.RELEASING:
                db.execute(
                    "UPDATE leases SET state = 'releasing', release_reason = ? WHERE id = ?",
                    (reason, lease_id),
                )
            db.execute(
                "UPDATE partitions SET state = 'releasing', clean = 0, updated_at = ? "
                "WHERE uuid = ? AND lease_id = ?",
                (time.time(), row["partition_uuid"], lease_id),
            )
            if row["state"] != LeaseState.RELEASING:
                audit_log.lease_event(db, "lease.releasing", lease_id, {"reason": reason})

    def finish_release(self, lease_id: str, *, state: str = LeaseState.RELEASED) -> None:
        """The lease is over (released, or lost): the partition no longer names it as holder."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT partition_uuid FROM leases WHERE id = ?", (lease_id,)
            ).fetchone()
            ended = db.execute(
                f"UPDATE leases SET state = ?, released_at = ? WHERE id = ? "  # noqa: S608 - constant
                f"AND state IN {_LIVE_SQL}",
                (LeaseState(state).value, time.time(), lease_id),
            ).rowcount
            if ended:
                audit_log.lease_event(db, "lease.ended", lease_id, outcome=LeaseState(state).value)
            if row is not None:
                db.execute(
                    "UPDATE partitions SET lease_id = NULL, last_lease_id = ? "
                    "WHERE uuid = ? AND lease_id = ?",
                    (lease_id, row["partition_uuid"], lease_id),
                )

    def lose_lease(self, lease_id: str, reason: str) -> bool:
        """The partition under a live lease vanished or changed: the lease ends ``lost`` and the
        partition is quarantined, in one transaction. False if the lease was not live."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute(
                f"SELECT partition_uuid FROM leases WHERE id = ? AND state IN {_LIVE_SQL}",  # noqa: S608
                (lease_id,),
            ).fetchone()
            if row is None:
                return False
            db.execute(
                "UPDATE leases SET state = 'lost', released_at = ?, release_reason = ?, "
                "outcome = ? WHERE id = ?",
                (now, reason, f"lost: {reason}", lease_id),
            )
            db.execute(
                "UPDATE partitions SET state = 'quarantined', clean = 0, reason = ?, "
                "lease_id = NULL, last_lease_id = ?, updated_at = ? WHERE uuid = ?",
                (reason, lease_id, now, row["partition_uuid"]),
            )
            audit_log.lease_event(
                db, "lease.lost", lease_id, {"reason": reason}, outcome="quarantined"
            )
        return True

    def set_lease_outcome(self, lease_id: str, outcome: str) -> None:
        """How the lease ended for its partition, answered again to a repeated release."""
        with self.transaction() as db:
            db.execute("UPDATE leases SET outcome = ? WHERE id = ?", (outcome, lease_id))

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
        certificate: dict[str, Any] | None = None,
    ) -> int:
        """A scrub's result and its signed certificate (when it produced one), with one audit
        record naming the certificate's SHA-256, in one transaction."""
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO scrubs (partition_uuid, lease_id, started_at, finished_at, verified, "
                "result, error) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (partition_uuid, lease_id, started_at, finished_at, int(verified),
                 json.dumps(result, sort_keys=True), error),
            )  # fmt: skip
            detail: dict[str, Any] = {"error": error} if error else {}
            for key in ("policy", "bytes_verified", "coverage"):
                if key in result:
                    detail[key] = result[key]
            if certificate is not None:
                certificate_id = insert_certificate(
                    db, partition_uuid, lease_id, verified, certificate
                )
                detail["certificate_id"] = certificate_id
                detail["certificate_sha256"] = certificate_digest(certificate)
            audit_log.append(
                db, "scrub.result", outcome="verified" if verified else "failed",
                lease_id=lease_id, partition_uuid=partition_uuid, detail=detail,
            )  # fmt: skip
            return int(cursor.lastrowid or 0)

    # -- scrub certificates ------------------------------------------------------------------

    def add_certificate(
        self, partition_uuid: str, lease_id: str | None, verified: bool, document: dict[str, Any]
    ) -> int:
        with self.transaction() as db:
            certificate_id = insert_certificate(db, partition_uuid, lease_id, verified, document)
            audit_log.append(
                db, "scrub.certificate", outcome="verified" if verified else "failed",
                lease_id=lease_id, partition_uuid=partition_uuid,
                detail={"certificate_id": certificate_id,
                        "certificate_sha256": certificate_digest(document)},
            )  # fmt: skip
            return certificate_id

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
            entry_id = int(cursor.lastrowid or 0)
            audit_log.append(
                db, "layout.started", outcome="running",
                detail={"gpu_uuid": gpu_uuid, "journal_id": entry_id, "plan": plan},
            )  # fmt: skip
            return entry_id

    def finish_layout(self, entry_id: int, status: str, detail: str = "") -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE layout_journal SET status = ?, detail = ?, finished_at = ? WHERE id = ?",
                (status, detail, time.time(), entry_id),
            )
            row = db.execute(
                "SELECT gpu_uuid FROM layout_journal WHERE id = ?", (entry_id,)
            ).fetchone()
            audit_log.append(
                db, "layout.finished", outcome=status,
                detail={"gpu_uuid": row[0] if row else None, "journal_id": entry_id,
                        **({"detail": detail} if detail else {})},
            )  # fmt: skip

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
