"""The journal's numbers for the metrics endpoint (agent/metrics, docs/metrics.md), read on a
read-only connection of their own.

The daemon's :class:`~agent.store.Store` connection belongs to its executor thread; a scrape runs
on the metrics server's thread, so it opens the file again with ``mode=ro`` (it can never write,
and never creates a missing journal) and reads everything in one read transaction: WAL lets it
read a consistent snapshot while the daemon writes, and a short busy timeout keeps a scrape from
waiting on a checkpoint for long.

Invariants the counters built from these numbers rely on: ``leases``, ``scrubs`` and
``health_events`` rows are never deleted, and a scrub row is written whole (``record_scrub``);
``command_refusals`` is trimmed to its newest rows, but its AUTOINCREMENT sequence never goes
back.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.errors import StoreError
from agent.store.records import LIVE_LEASE_STATES

_LIVE_SQL: Final = "(" + ", ".join(f"'{state}'" for state in LIVE_LEASE_STATES) + ")"

# A scrape gives up on a journal locked this long (Prometheus' default scrape timeout is 10 s).
READ_TIMEOUT_S: Final = 2.0


@dataclass(frozen=True)
class ScrubTallies:
    """Every scrub the journal recorded."""

    count: int
    # Failed scrubs (not verified) by their error text: classified by the caller.
    failures: dict[str, int]
    # How many scrubs took at most each of the requested bounds (cumulative), and their sum.
    duration_buckets: tuple[int, ...]
    duration_count: int
    duration_sum_s: float
    # Bytes proven clean: for each verified scrub, the bytes every pass verified.
    verified_bytes: int


@dataclass(frozen=True)
class OutboxTallies:
    reports: int
    bytes: int
    unacked: int
    oldest_unacked_at: float | None
    # Reports dropped because the outbox was full (meta ``link_dropped``), ever.
    dropped: int


@dataclass(frozen=True)
class RefusalTallies:
    # The refusal table's AUTOINCREMENT sequence: every refusal ever journaled, trimmed or not.
    total: int
    # The reasons of the refusals after the caller's cursor (see read_tallies).
    new_by_reason: dict[str, int]
    # How many of those were already trimmed from the table (their reason is gone).
    new_trimmed: int


@dataclass(frozen=True)
class JournalTallies:
    # Present partitions by state.
    partitions: dict[str, int]
    # (GPU index, GPU UUID) of every present partition's GPU.
    gpus: tuple[tuple[int, str], ...]
    # Live leases by state.
    live_leases: dict[str, int]
    # Leases that left 'granting' for the tenant (an undone grant never did).
    leases_granted: int
    # Ended leases by the first word of their outcome ("clean", "quarantined", "not granted",
    # ...), or "lost" for every lost lease; leases whose outcome is not written yet are not
    # counted.
    lease_outcomes: dict[str, int]
    scrubs: ScrubTallies
    # (GPU index, kind, action) -> events.
    health_events: dict[tuple[int, str, str], int]
    health_holds: int
    outbox: OutboxTallies
    cordoned: bool
    refusals: RefusalTallies


def read_tallies(
    path: Path,
    *,
    scrub_bounds: Sequence[float],
    refusals_after: int | None,
    refusals_since: float = 0.0,
    timeout_s: float = READ_TIMEOUT_S,
) -> JournalTallies:
    """Read the journal at ``path`` once; StoreError if it cannot be read.

    ``refusals_after`` is the caller's cursor in the refusal table (its ``total`` from the last
    read): the refusals after it are tallied by reason. Without a cursor (a first read), those
    journaled at or after ``refusals_since`` are.
    """
    try:
        db = sqlite3.connect(
            f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=timeout_s,
            isolation_level=None,
        )  # fmt: skip
    except sqlite3.Error as error:
        raise StoreError(f"cannot open the journal at {path} to read metrics: {error}") from error
    try:
        db.execute("BEGIN")  # one snapshot for every number below
        return JournalTallies(
            partitions=_by_key(
                db, "SELECT state, COUNT(*) FROM partitions WHERE present = 1 GROUP BY state"
            ),
            gpus=tuple(
                (int(index), str(uuid))
                for index, uuid in db.execute(
                    "SELECT DISTINCT gpu_index, gpu_uuid FROM partitions WHERE present = 1 "
                    "ORDER BY gpu_index, gpu_uuid"
                )
            ),
            live_leases=_by_key(
                db,
                f"SELECT state, COUNT(*) FROM leases WHERE state IN {_LIVE_SQL} "  # noqa: S608
                "GROUP BY state",
            ),
            leases_granted=_scalar(
                db,
                "SELECT COUNT(*) FROM leases WHERE state != 'granting' "
                "AND outcome != 'not granted'",
            ),
            lease_outcomes=_by_key(
                db,
                # A lost lease stays lost (terminal state) whatever outcome is written later.
                "SELECT CASE WHEN state = 'lost' THEN 'lost' "
                "ELSE substr(outcome, 1, instr(outcome || ':', ':') - 1) END AS word, COUNT(*) "
                "FROM leases WHERE state IN ('released', 'lost') AND outcome != '' "
                "GROUP BY word",
            ),
            scrubs=_scrubs(db, scrub_bounds),
            health_events={
                (int(index), str(kind), str(action)): int(count)
                for index, kind, action, count in db.execute(
                    "SELECT gpu_index, kind, action, COUNT(*) FROM health_events "
                    "GROUP BY gpu_index, kind, action"
                )
            },
            health_holds=_scalar(db, "SELECT COUNT(*) FROM health_holds"),
            outbox=_outbox(db),
            cordoned=_meta(db, "commands_cordoned") == "1",
            refusals=_refusals(db, refusals_after, refusals_since),
        )
    except (sqlite3.Error, ValueError) as error:
        raise StoreError(f"cannot read the journal at {path} for metrics: {error}") from error
    finally:
        db.close()


def _scalar(db: sqlite3.Connection, query: str, arguments: Sequence[object] = ()) -> int:
    row = db.execute(query, arguments).fetchone()
    return 0 if row is None or row[0] is None else int(row[0])


def _by_key(db: sqlite3.Connection, query: str, arguments: Sequence[object] = ()) -> dict[str, int]:
    return {str(key): int(count) for key, count in db.execute(query, arguments)}


def _meta(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _scrubs(db: sqlite3.Connection, bounds: Sequence[float]) -> ScrubTallies:
    # A clock stepped back between start and finish must not make a negative duration.
    duration = "MAX(finished_at - started_at, 0.0)"
    buckets = "".join(f", TOTAL({duration} <= ?)" for _ in bounds)
    row = db.execute(
        f"SELECT COUNT(*), TOTAL({duration}){buckets} FROM scrubs "  # noqa: S608 - ? marks only
        "WHERE finished_at IS NOT NULL",
        tuple(bounds),
    ).fetchone()
    failures = _by_key(db, "SELECT error, COUNT(*) FROM scrubs WHERE verified = 0 GROUP BY error")
    verified_bytes = _scalar(
        db,
        # ScrubResult.bytes_verified: the bytes every pass verified (the smallest pass).
        "SELECT TOTAL((SELECT MIN(CAST(json_extract(p.value, '$.bytes_verified') AS INTEGER)) "
        "FROM json_each(s.result, '$.passes') AS p)) FROM scrubs AS s "
        "WHERE s.verified = 1 AND json_valid(s.result)",
    )
    return ScrubTallies(
        count=_scalar(db, "SELECT COUNT(*) FROM scrubs"),
        failures=failures,
        duration_buckets=tuple(int(value) for value in row[2:]),
        duration_count=int(row[0]),
        duration_sum_s=float(row[1]),
        verified_bytes=verified_bytes,
    )


def _outbox(db: sqlite3.Connection) -> OutboxTallies:
    row = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0), COALESCE(SUM(acked_at IS NULL), 0), "
        "MIN(CASE WHEN acked_at IS NULL THEN created_at END) FROM link_outbox"
    ).fetchone()
    return OutboxTallies(
        reports=int(row[0]),
        bytes=int(row[1]),
        unacked=int(row[2]),
        oldest_unacked_at=None if row[3] is None else float(row[3]),
        dropped=int(_meta(db, "link_dropped") or 0),
    )


def _refusals(db: sqlite3.Connection, after: int | None, since: float) -> RefusalTallies:
    total = _scalar(db, "SELECT seq FROM sqlite_sequence WHERE name = 'command_refusals'")
    if after is None:
        new = _by_key(
            db,
            "SELECT reason, COUNT(*) FROM command_refusals WHERE at >= ? GROUP BY reason",
            (since,),
        )
        return RefusalTallies(total=total, new_by_reason=new, new_trimmed=0)
    new = _by_key(
        db, "SELECT reason, COUNT(*) FROM command_refusals WHERE id > ? GROUP BY reason", (after,)
    )
    # A journal replaced under the agent (state recover) starts its sequence again: nothing new.
    trimmed = max(total - after - sum(new.values()), 0)
    return RefusalTallies(total=total, new_by_reason=new, new_trimmed=trimmed)
