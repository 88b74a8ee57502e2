"""The controller's registry and report store behind one small interface.

:class:`ControllerStore` is everything the enrollment and link code may ask of storage;
:class:`SqliteControllerStore` implements it on SQLite (WAL, ``synchronous=FULL``: a report is on
disk before it is acked). A PostgreSQL implementation replaces it without touching the link
code: the link never sees SQL. Reports are keyed by (node, epoch, seq), so a report sent twice
is stored once. All calls run on one thread (the controller's executor).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.controller.command_store import SCHEMA as COMMAND_SCHEMA
from agent.controller.command_store import CommandOutcome, CommandStore
from agent.errors import EnrollmentRefusedError, StoreError
from agent.store import write_transaction


@dataclass(frozen=True)
class TokenRecord:
    id: str
    node_id: str
    secret_sha256: bytes
    created_at: float
    expires_at: float
    used_at: float | None


@dataclass(frozen=True)
class NodeEnrollment:
    node_id: str
    spiffe_id: str
    attestation: str  # "attested" or "unattested"
    ek_public: bytes
    ek_certificate: bytes
    ak_public: bytes
    ak_name: bytes
    scrub_key_pem: str
    cert_serial: str
    cert_not_after: float
    agent_version: str


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    spiffe_id: str
    attestation: str
    enrolled_at: float
    ek_public: bytes
    ak_public: bytes
    ak_name: bytes
    scrub_key_pem: str
    cert_serial: str
    cert_not_after: float
    agent_version: str
    boot_id: str
    epoch: int
    last_seen: float
    inventory: bytes  # the latest InventorySnapshot, serialized; empty when none yet


@dataclass(frozen=True)
class StoredCertificate:
    seq: int
    partition_uuid: str
    previous_lease_id: str
    scrub_verified: bool
    signature_checked: bool
    finished_at: str
    payload: bytes
    signature: bytes


@dataclass(frozen=True)
class IncomingReport:
    """A validated report to commit. ``inventory`` and ``certificate`` are the derived rows the
    store keeps besides the report itself (latest inventory, scrub certificate index)."""

    node_id: str
    epoch: int
    seq: int
    kind: str
    created_at: float
    body: bytes
    inventory: bytes | None = None
    certificate: StoredCertificate | None = None
    command: CommandOutcome | None = None


class ControllerStore(Protocol):
    def create_token(
        self, token_id: str, node_id: str, secret_sha256: bytes, expires_at: float
    ) -> None: ...
    def token(self, token_id: str) -> TokenRecord | None: ...
    def complete_enrollment(self, token_id: str | None, enrollment: NodeEnrollment) -> None: ...
    def renew_certificate(self, node_id: str, serial: str, not_after: float) -> None: ...
    def node(self, node_id: str) -> NodeRecord | None: ...
    def nodes(self) -> list[NodeRecord]: ...
    def record_hello(self, node_id: str, agent_version: str, boot_id: str, epoch: int) -> int: ...
    def commit_reports(self, reports: Sequence[IncomingReport]) -> set[tuple[str, int, int]]: ...
    def certificates(self, node_id: str) -> list[StoredCertificate]: ...
    def report_counts(self, node_id: str) -> dict[str, int]: ...
    def recent_reports(self, node_id: str, kind: str, limit: int) -> list[bytes]: ...
    def reports_received(self, node_id: str, kind: str) -> list[ReceivedReport]: ...
    @property
    def commands(self) -> CommandStore: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class ReceivedReport:
    epoch: int
    seq: int
    received_at: float
    body: bytes


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    secret_sha256 BLOB NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL
);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    attestation TEXT NOT NULL CHECK (attestation IN ('attested', 'unattested')),
    enrolled_at REAL NOT NULL,
    ek_public BLOB NOT NULL,
    ek_certificate BLOB NOT NULL,
    ak_public BLOB NOT NULL,
    ak_name BLOB NOT NULL,
    scrub_key_pem TEXT NOT NULL,
    cert_serial TEXT NOT NULL,
    cert_not_after REAL NOT NULL,
    agent_version TEXT NOT NULL DEFAULT '',
    boot_id TEXT NOT NULL DEFAULT '',
    epoch INTEGER NOT NULL DEFAULT 0,
    last_seen REAL NOT NULL DEFAULT 0,
    inventory BLOB NOT NULL DEFAULT x''
);
CREATE TABLE IF NOT EXISTS reports (
    node_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    created_at REAL NOT NULL,
    received_at REAL NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (node_id, epoch, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS scrub_certificates (
    node_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    partition_uuid TEXT NOT NULL,
    previous_lease_id TEXT NOT NULL,
    scrub_verified INTEGER NOT NULL,
    signature_checked INTEGER NOT NULL,
    finished_at TEXT NOT NULL,
    payload BLOB NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (node_id, epoch, seq)
) WITHOUT ROWID;
"""


class SqliteControllerStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._db.executescript(COMMAND_SCHEMA)
            path.chmod(0o600)
        except (sqlite3.Error, OSError) as error:
            raise StoreError(f"cannot open the controller database {path}: {error}") from error

        self.commands = CommandStore(self._db)

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return write_transaction(self._db, "controller database")

    # -- tokens and enrollment --------------------------------------------------------------

    def create_token(
        self, token_id: str, node_id: str, secret_sha256: bytes, expires_at: float
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO tokens (id, node_id, secret_sha256, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (token_id, node_id, secret_sha256, time.time(), expires_at),
            )

    def token(self, token_id: str) -> TokenRecord | None:
        row = self._db.execute(
            "SELECT id, node_id, secret_sha256, created_at, expires_at, used_at FROM tokens "
            "WHERE id = ?",
            (token_id,),
        ).fetchone()
        if row is None:
            return None
        return TokenRecord(row[0], row[1], bytes(row[2]), row[3], row[4], row[5])

    def complete_enrollment(self, token_id: str | None, enrollment: NodeEnrollment) -> None:
        """Use the token and record the node in one transaction: a token raced by two
        enrollments enrolls one node, the other is refused with nothing written."""
        now = time.time()
        with self._transaction() as db:
            if token_id is not None:
                used = db.execute(
                    "UPDATE tokens SET used_at = ? WHERE id = ? AND used_at IS NULL "
                    "AND expires_at > ? AND node_id = ?",
                    (now, token_id, now, enrollment.node_id),
                ).rowcount
                if used != 1:
                    raise EnrollmentRefusedError(
                        "bootstrap token was used or expired while this enrollment ran"
                    )
            e = enrollment
            db.execute(
                "INSERT INTO nodes (id, spiffe_id, attestation, enrolled_at, ek_public, "
                "ek_certificate, ak_public, ak_name, scrub_key_pem, cert_serial, cert_not_after, "
                "agent_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET spiffe_id = excluded.spiffe_id, "
                "attestation = excluded.attestation, enrolled_at = excluded.enrolled_at, "
                "ek_public = excluded.ek_public, ek_certificate = excluded.ek_certificate, "
                "ak_public = excluded.ak_public, ak_name = excluded.ak_name, "
                "scrub_key_pem = excluded.scrub_key_pem, cert_serial = excluded.cert_serial, "
                "cert_not_after = excluded.cert_not_after, agent_version = excluded.agent_version",
                (e.node_id, e.spiffe_id, e.attestation, now, e.ek_public, e.ek_certificate,
                 e.ak_public, e.ak_name, e.scrub_key_pem, e.cert_serial, e.cert_not_after,
                 e.agent_version),
            )  # fmt: skip

    def renew_certificate(self, node_id: str, serial: str, not_after: float) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE nodes SET cert_serial = ?, cert_not_after = ? WHERE id = ?",
                (serial, not_after, node_id),
            )

    # -- nodes -------------------------------------------------------------------------------

    _NODE_COLUMNS = (
        "id, spiffe_id, attestation, enrolled_at, ek_public, ak_public, ak_name, scrub_key_pem, "
        "cert_serial, cert_not_after, agent_version, boot_id, epoch, last_seen, inventory"
    )

    @staticmethod
    def _node(row: sqlite3.Row | tuple[object, ...]) -> NodeRecord:
        return NodeRecord(
            node_id=str(row[0]), spiffe_id=str(row[1]), attestation=str(row[2]),
            enrolled_at=float(row[3]), ek_public=bytes(row[4]), ak_public=bytes(row[5]),  # type: ignore[arg-type]
            ak_name=bytes(row[6]), scrub_key_pem=str(row[7]), cert_serial=str(row[8]),  # type: ignore[arg-type]
            cert_not_after=float(row[9]), agent_version=str(row[10]), boot_id=str(row[11]),  # type: ignore[arg-type]
            epoch=int(row[12]), last_seen=float(row[13]), inventory=bytes(row[14]),  # type: ignore[arg-type]
        )  # fmt: skip

    def node(self, node_id: str) -> NodeRecord | None:
        row = self._db.execute(
            f"SELECT {self._NODE_COLUMNS} FROM nodes WHERE id = ?",  # noqa: S608 - constant
            (node_id,),
        ).fetchone()
        return None if row is None else self._node(row)

    def nodes(self) -> list[NodeRecord]:
        rows = self._db.execute(f"SELECT {self._NODE_COLUMNS} FROM nodes ORDER BY id")  # noqa: S608
        return [self._node(row) for row in rows]

    def record_hello(self, node_id: str, agent_version: str, boot_id: str, epoch: int) -> int:
        """Note a node's Hello; the highest seq of ``epoch`` held for it (where to resume)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE nodes SET agent_version = ?, boot_id = ?, epoch = ?, last_seen = ? "
                "WHERE id = ?",
                (agent_version, boot_id, epoch, time.time(), node_id),
            )
            row = db.execute(
                "SELECT MAX(seq) FROM reports WHERE node_id = ? AND epoch = ?", (node_id, epoch)
            ).fetchone()
        return int(row[0] or 0)

    # -- reports -----------------------------------------------------------------------------

    def commit_reports(self, reports: Sequence[IncomingReport]) -> set[tuple[str, int, int]]:
        """Store the reports (a duplicate is ignored) and their derived rows, in one
        transaction. Returns the (node, epoch, seq) of each report among them whose command
        result is the one kept for its command (its first result, or that report sent again):
        the result hooks run for it, not for a re-delivery's duplicate answer."""
        now = time.time()
        kept: set[tuple[str, int, int]] = set()
        with self._transaction() as db:
            seen: set[str] = set()
            for report in reports:
                inserted = db.execute(
                    "INSERT OR IGNORE INTO reports (node_id, epoch, seq, kind, created_at, "
                    "received_at, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (report.node_id, report.epoch, report.seq, report.kind, report.created_at,
                     now, report.body),
                ).rowcount  # fmt: skip
                seen.add(report.node_id)
                command = report.command
                if inserted and command is not None:
                    CommandStore.record_result(db, report.node_id, command)
                if command is not None and CommandStore.holds_result(db, report.node_id, command):
                    kept.add((report.node_id, report.epoch, report.seq))
                if not inserted:
                    continue  # a duplicate: already stored, with its derived rows
                if report.inventory is not None:
                    db.execute(
                        "UPDATE nodes SET inventory = ? WHERE id = ?",
                        (report.inventory, report.node_id),
                    )
                cert = report.certificate
                if cert is not None:
                    db.execute(
                        "INSERT OR IGNORE INTO scrub_certificates (node_id, epoch, seq, "
                        "partition_uuid, previous_lease_id, scrub_verified, signature_checked, "
                        "finished_at, payload, signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (report.node_id, report.epoch, report.seq, cert.partition_uuid,
                         cert.previous_lease_id, int(cert.scrub_verified),
                         int(cert.signature_checked), cert.finished_at, cert.payload,
                         cert.signature),
                    )  # fmt: skip
            for node_id in seen:
                db.execute("UPDATE nodes SET last_seen = ? WHERE id = ?", (now, node_id))
        return kept

    def certificates(self, node_id: str) -> list[StoredCertificate]:
        rows = self._db.execute(
            "SELECT seq, partition_uuid, previous_lease_id, scrub_verified, signature_checked, "
            "finished_at, payload, signature FROM scrub_certificates WHERE node_id = ? "
            "ORDER BY epoch, seq",
            (node_id,),
        )
        return [
            StoredCertificate(
                int(r[0]),
                str(r[1]),
                str(r[2]),
                bool(r[3]),
                bool(r[4]),
                str(r[5]),
                bytes(r[6]),
                bytes(r[7]),
            )
            for r in rows
        ]

    def recent_reports(self, node_id: str, kind: str, limit: int) -> list[bytes]:
        """The bodies of ``node_id``'s newest reports of ``kind`` (serialized Reports)."""
        rows = self._db.execute(
            "SELECT body FROM reports WHERE node_id = ? AND kind = ? "
            "ORDER BY received_at DESC, seq DESC LIMIT ?",
            (node_id, kind, limit),
        )
        return [bytes(row[0]) for row in rows]

    def reports_received(self, node_id: str, kind: str) -> list[ReceivedReport]:
        """Every report of ``kind`` from ``node_id``, in the order they were received."""
        rows = self._db.execute(
            "SELECT epoch, seq, received_at, body FROM reports WHERE node_id = ? AND kind = ? "
            "ORDER BY received_at, epoch, seq",
            (node_id, kind),
        )
        return [ReceivedReport(int(r[0]), int(r[1]), float(r[2]), bytes(r[3])) for r in rows]

    def report_counts(self, node_id: str) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT kind, COUNT(*) FROM reports WHERE node_id = ? GROUP BY kind", (node_id,)
        )
        return {str(kind): int(count) for kind, count in rows}
