"""The node's remote-command journal (migration 6): the replay cache, the results of the one run
of each command, the refusals, and whether the node is cordoned.

Every write that produces a report (a result, a refusal) stores the report in the link outbox in
the same transaction (``Outbox.transaction``): after a crash either both are there or neither.
Used from the journal's thread (the daemon's executor), like the rest of the store.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from agent.store import Store, audit, put_meta
from agent.store.outbox import Outbox

# Refusals kept in the journal (oldest go first): an attacker who can reach the stream can make
# the node refuse as often as it likes, and must not be able to fill the disk with it.
MAX_REFUSALS: Final = 1000
_CORDON_KEY: Final = "commands_cordoned"
_CORDON_REASON_KEY: Final = "commands_cordon_reason"
# When the daemon found the journal lost and began a new one: the replay cache starts then.
JOURNAL_LOST_AT: Final = "journal_lost_at"


class ClaimState(StrEnum):
    NEW = "new"  # never seen: run it
    RUNNING = "running"  # claimed before, no result: the agent stopped while it ran
    DONE = "done"  # ran: its stored result
    # Not in the cache, but issued before the cache began: the journal was made again after a
    # loss (the old cache went with it) or restored from a backup (whose cache may not know
    # it) after the command was issued, so it may have run already.
    BEFORE_CACHE = "before_cache"


@dataclass(frozen=True)
class Claim:
    state: ClaimState
    result: bytes | None = None  # the serialized CommandResult of a DONE command


@dataclass(frozen=True)
class Refusal:
    command_id: bytes
    reason: str
    detail: str
    at: float


def _meta_time(store: Store, key: str) -> float:
    """A time the journal's meta holds; 0 when absent, +inf when unreadable (unknown: every
    command the cache does not hold is then refused)."""
    value = store.get_meta(key)
    try:
        return float(value) if value is not None else 0.0
    except ValueError:
        return float("inf")


class CommandLog:
    def __init__(self, store: Store, outbox: Outbox) -> None:
        self._store = store
        self._outbox = outbox
        self._db = store._db  # same package: the command log is part of the journal
        # The cache holds every command received since the journal that holds it was made
        # again after a loss (the daemon marks ``journal_lost_at``) and since a backup replaced
        # it (agent/store/restore.py, ``restored_at``); both happen at start-up, so this is read
        # once per agent.
        self.complete_since = max(
            _meta_time(store, JOURNAL_LOST_AT), _meta_time(store, "restored_at")
        )

    def claim(self, command_id: bytes, kind: str, not_after: float, issued_at: float) -> Claim:
        """Enter ``command_id`` in the replay cache, or say what the cache holds for it.

        Entered here, before anything runs: a command is run at most once, whatever crashes.
        """
        with self._store.transaction() as db:
            row = db.execute(
                "SELECT state, result FROM commands WHERE id = ?", (command_id,)
            ).fetchone()
            if row is not None:
                state = ClaimState(str(row["state"]))
                result = None if row["result"] is None else bytes(row["result"])
                return Claim(state, result)
            if issued_at < self.complete_since:
                return Claim(ClaimState.BEFORE_CACHE)
            db.execute(
                "INSERT INTO commands (id, kind, received_at, not_after, state) "
                "VALUES (?, ?, ?, ?, 'running')",
                (command_id, kind, time.time(), not_after),
            )
        return Claim(ClaimState.NEW)

    def finish(
        self,
        command_id: bytes,
        result: bytes,
        report: bytes,
        refusal: str = "",
        detail: str = "",
        ok: bool = True,
    ) -> int | None:
        """Store the result of the command's run and its report; the report's seq. A command
        the node's own state refused (``refusal``: cordoned) is journaled as a refusal too."""
        with self._outbox.transaction() as tx:
            tx.db.execute(
                "UPDATE commands SET state = 'done', result = ? WHERE id = ?",
                (result, command_id),
            )
            if refusal:
                self._journal_refusal(tx.db, command_id, refusal, detail)
            row = tx.db.execute("SELECT kind FROM commands WHERE id = ?", (command_id,)).fetchone()
            audit.append(
                tx.db, f"command.{row[0] if row else 'unknown'}",
                outcome="refused" if refusal else ("done" if ok else "failed"),
                detail={"command_id": command_id.hex(),
                        **({"refusal": refusal} if refusal else {}),
                        **({"detail": detail} if detail else {})},
            )  # fmt: skip
            return tx.enqueue("command_result", report, droppable=False)

    @staticmethod
    def _journal_refusal(
        db: sqlite3.Connection, command_id: bytes, reason: str, detail: str
    ) -> None:
        db.execute(
            "INSERT INTO command_refusals (command_id, reason, detail, at) VALUES (?, ?, ?, ?)",
            (command_id, reason, detail, time.time()),
        )
        db.execute(
            "DELETE FROM command_refusals WHERE id <= (SELECT MAX(id) FROM command_refusals) - ?",
            (MAX_REFUSALS,),
        )

    def refuse(self, command_id: bytes, reason: str, detail: str, report: bytes) -> int | None:
        """Journal a refusal and report it. The report may be dropped when the outbox is full
        (refusals are counted and kept here, bounded)."""
        with self._outbox.transaction() as tx:
            self._journal_refusal(tx.db, command_id, reason, detail)
            audit.append(
                tx.db, "command.refused", outcome=reason,
                detail={"command_id": command_id.hex(), "detail": detail},
            )  # fmt: skip
            return tx.enqueue("command_result", report, droppable=True)

    def refusals(self, limit: int = 100) -> list[Refusal]:
        rows = self._db.execute(
            "SELECT command_id, reason, detail, at FROM command_refusals ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [
            Refusal(bytes(r["command_id"]), str(r["reason"]), str(r["detail"]), float(r["at"]))
            for r in rows
        ]

    def purge(self, before: float) -> int:
        """Forget the commands whose not_after is before ``before`` (now): the expiry check
        refuses them from then on, so the cache need not."""
        with self._store.transaction() as db:
            return int(db.execute("DELETE FROM commands WHERE not_after < ?", (before,)).rowcount)

    def cached(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM commands").fetchone()[0])

    # -- cordon --------------------------------------------------------------------------------

    def cordoned(self) -> tuple[bool, str]:
        return (
            self._store.get_meta(_CORDON_KEY) == "1",
            self._store.get_meta(_CORDON_REASON_KEY) or "",
        )

    def set_cordoned(self, cordoned: bool, reason: str) -> None:
        with self._store.transaction() as db:
            put_meta(db, _CORDON_KEY, "1" if cordoned else "0")
            put_meta(db, _CORDON_REASON_KEY, reason)
            audit.append(
                db, "node.cordon", outcome="cordoned" if cordoned else "uncordoned",
                detail={"reason": reason},
            )  # fmt: skip
