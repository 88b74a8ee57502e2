"""The controller link's outbox (migration 5): it shares the journal's file and discipline (WAL,
FULL sync, one thread), so a report and the state change it describes can never disagree after a
crash."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from agent.errors import OutboxFullError
from agent.store import Store, audit


@dataclass(frozen=True)
class OutboxLimits:
    max_reports: int
    max_bytes: int
    # Rows kept free for the events of leases already granted (see Outbox.enqueue).
    grant_reserve: int
    retention_s: float


@dataclass(frozen=True)
class OutboxEntry:
    seq: int
    kind: str
    created_at: float
    body: bytes


@dataclass(frozen=True)
class OutboxStats:
    epoch: int
    last_seq: int
    rows: int
    bytes: int
    unacked: int
    # Health samples dropped because the outbox was full: never sent (assigned a seq or not).
    dropped: int
    # Of those, how many had a seq (evicted unacked): the controller will never see those seqs.
    dropped_with_seq: int


class OutboxTransaction:
    """The connection of an open journal transaction, and the outbox to enqueue reports in it."""

    def __init__(self, outbox: Outbox, db: sqlite3.Connection) -> None:
        self._outbox = outbox
        self.db = db

    def enqueue(self, kind: str, body: bytes, *, droppable: bool) -> int | None:
        return self._outbox._enqueue(self.db, kind, body, droppable=droppable, opens_lease=False)


class Outbox:
    """The link's outbox table, used from the journal's thread (the daemon's executor).

    Invariants: a never-dropped report (``droppable`` false) leaves the table only after the
    controller acked it and the retention window passed, or to make room once it was acked;
    when one cannot be stored, :class:`OutboxFullError` is raised and nothing is written. A
    report that opens a lease must leave ``grant_reserve`` rows free, so the events of leases
    already granted (release, scrub certificate) still fit.
    """

    _BYTES_PER_RESERVED_ROW = 4096

    def __init__(self, store: Store, limits: OutboxLimits) -> None:
        self._store = store
        self._db = store._db  # same module: the outbox is part of the journal
        self.limits = limits
        row = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0), "
            "COALESCE(SUM(acked_at IS NULL), 0) FROM link_outbox"
        ).fetchone()
        self._rows, self._bytes, self._unacked = int(row[0]), int(row[1]), int(row[2])
        if store.get_meta("link_epoch") is None:
            # A fresh sequence space: 63 random bits so the controller never mixes it with the
            # numbers of a journal this node had before.
            store.set_meta("link_epoch", str(int.from_bytes(os.urandom(8), "big") >> 1 or 1))

    def _counter(self, db: sqlite3.Connection, key: str) -> int:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return 0 if row is None else int(row[0])

    def _add_counter(self, db: sqlite3.Connection, key: str, amount: int) -> None:
        db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
            "value = CAST(CAST(value AS INTEGER) + ? AS TEXT)",
            (key, str(amount), amount),
        )

    def epoch(self) -> int:
        return int(self._store.get_meta("link_epoch") or 0)

    def last_seq(self) -> int:
        row = self._db.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'link_outbox'"
        ).fetchone()
        return 0 if row is None else int(row[0])

    def stats(self) -> OutboxStats:
        return OutboxStats(
            epoch=self.epoch(),
            last_seq=self.last_seq(),
            rows=self._rows,
            bytes=self._bytes,
            unacked=self._unacked,
            dropped=self._counter(self._db, "link_dropped"),
            dropped_with_seq=self._counter(self._db, "link_dropped_with_seq"),
        )

    def free_rows(self) -> int:
        return self.limits.max_reports - self._rows

    def enqueue(
        self, kind: str, body: bytes, *, droppable: bool, opens_lease: bool = False
    ) -> int | None:
        """Store a report; its seq, or None when a droppable report was dropped (counted)."""
        with self._store.transaction() as db:
            return self._enqueue(db, kind, body, droppable=droppable, opens_lease=opens_lease)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[OutboxTransaction]:
        """A journal transaction whose reports (``enqueue``) are stored together with the
        caller's own rows, or none is: the counters kept beside the table roll back with it,
        a failed commit included."""
        rows, size, unacked = self._rows, self._bytes, self._unacked
        try:
            with self._store.transaction() as db:
                yield OutboxTransaction(self, db)
        except BaseException:
            self._rows, self._bytes, self._unacked = rows, size, unacked
            raise

    def _fits(self, size: int, reserve: int) -> bool:
        limits = self.limits
        return (
            self._rows + 1 <= limits.max_reports - reserve
            and self._bytes + size <= limits.max_bytes - reserve * self._BYTES_PER_RESERVED_ROW
        )

    def _enqueue(
        self, db: sqlite3.Connection, kind: str, body: bytes, *, droppable: bool, opens_lease: bool
    ) -> int | None:
        reserve = self.limits.grant_reserve if opens_lease else 0
        rows, size, unacked = self._rows, self._bytes, self._unacked
        try:
            while not self._fits(len(body), reserve):
                # Make room: first what the controller already holds (oldest first), then
                # health samples never sent (oldest first, counted); never anything else.
                victim = db.execute(
                    "SELECT seq, LENGTH(body) FROM link_outbox WHERE acked_at IS NOT NULL "
                    "ORDER BY acked_at, seq LIMIT 1"
                ).fetchone()
                evicted_unacked = False
                if victim is None:
                    victim = db.execute(
                        "SELECT seq, LENGTH(body) FROM link_outbox WHERE acked_at IS NULL "
                        "AND droppable = 1 ORDER BY seq LIMIT 1"
                    ).fetchone()
                    evicted_unacked = True
                if victim is None:
                    if droppable:
                        self._add_counter(db, "link_dropped", 1)
                        return None
                    raise OutboxFullError(  # noqa: TRY301 - rolls the counters back below
                        f"the link outbox is full ({self._rows} reports, {self._bytes} bytes, "
                        f"none droppable): cannot store a {kind} report"
                        + (
                            f"; new grants need {self.limits.grant_reserve} reports of room "
                            "for the events of leases already granted"
                            if opens_lease
                            else ""
                        )
                        + ". The controller has not acknowledged reports for a while: check "
                        "the link (`accelguard status`, docs/link.md)"
                    )
                db.execute("DELETE FROM link_outbox WHERE seq = ?", (victim[0],))
                self._rows -= 1
                self._bytes -= int(victim[1])
                if evicted_unacked:
                    self._unacked -= 1
                    self._add_counter(db, "link_dropped", 1)
                    self._add_counter(db, "link_dropped_with_seq", 1)
            cursor = db.execute(
                "INSERT INTO link_outbox (kind, droppable, body, created_at) VALUES (?, ?, ?, ?)",
                (kind, int(droppable), body, time.time()),
            )
        except BaseException:
            # The transaction rolls back: so do the counters kept beside it.
            self._rows, self._bytes, self._unacked = rows, size, unacked
            raise
        self._rows += 1
        self._bytes += len(body)
        self._unacked += 1
        return int(cursor.lastrowid or 0)

    def enqueue_new_certificates(
        self, convert: Callable[[dict[str, Any]], bytes], limit: int = 100
    ) -> int:
        """Copy scrub certificates journaled since the last call into the outbox, in the same
        transaction as the cursor that remembers them: none is ever skipped or sent twice,
        whatever crashes when. Returns how many were copied."""
        with self._store.transaction() as db:
            rows, size, unacked = self._rows, self._bytes, self._unacked
            try:
                cursor = self._counter(db, "link_certificate_cursor")
                found = db.execute(
                    "SELECT id, document FROM certificates WHERE id > ? ORDER BY id LIMIT ?",
                    (cursor, limit),
                ).fetchall()
                for row in found:
                    body = convert(json.loads(row["document"]))
                    self._enqueue(db, "scrub_certificate", body, droppable=False, opens_lease=False)
                if found:
                    self._add_counter(db, "link_certificate_cursor", int(found[-1]["id"]) - cursor)
            except BaseException:
                self._rows, self._bytes, self._unacked = rows, size, unacked
                raise
            return len(found)

    def pending(self, after_seq: int, limit: int) -> list[OutboxEntry]:
        """Reports with seq > ``after_seq`` in order: unacked ones, and retained acked ones (a
        controller restored from a backup asks for those again)."""
        rows = self._db.execute(
            "SELECT seq, kind, created_at, body FROM link_outbox WHERE seq > ? "
            "ORDER BY seq LIMIT ?",
            (after_seq, limit),
        ).fetchall()
        return [OutboxEntry(int(r[0]), str(r[1]), float(r[2]), bytes(r[3])) for r in rows]

    def ack_through(self, seq: int) -> None:
        """The controller committed every report up to ``seq``: droppable ones go, the others
        are kept (acked) for the retention window."""
        now = time.time()
        with self._store.transaction() as db:
            gone = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0), "
                "COALESCE(SUM(acked_at IS NULL), 0) FROM link_outbox "
                "WHERE seq <= ? AND droppable = 1",
                (seq,),
            ).fetchone()
            db.execute("DELETE FROM link_outbox WHERE seq <= ? AND droppable = 1", (seq,))
            kept = db.execute(
                "UPDATE link_outbox SET acked_at = ? WHERE seq <= ? AND acked_at IS NULL",
                (now, seq),
            ).rowcount
            # The audit checkpoints these reports carried are now the controller's too.
            audit.ack_checkpoints(db, seq)
        self._rows -= int(gone[0])
        self._bytes -= int(gone[1])
        self._unacked -= int(gone[2]) + kept

    def purge_expired(self) -> int:
        """Drop acked reports older than the retention window."""
        cutoff = time.time() - self.limits.retention_s
        with self._store.transaction() as db:
            gone = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM link_outbox "
                "WHERE acked_at IS NOT NULL AND acked_at < ?",
                (cutoff,),
            ).fetchone()
            db.execute(
                "DELETE FROM link_outbox WHERE acked_at IS NOT NULL AND acked_at < ?", (cutoff,)
            )
        self._rows -= int(gone[0])
        self._bytes -= int(gone[1])
        return int(gone[0])
