"""The desired layout (migration 9): per GPU UUID what the last ``layout apply`` on that GPU asked
for, kept so that the agent can re-apply it at start-up and ``layout assert`` can check it.

Invariants:

* A row is written before the apply it records changes anything (``outcome`` 'applying'), in
  one transaction with its audit record: an apply interrupted by a crash is still desired, and
  the start-up re-apply completes it.
* A row is keyed by the GPU's UUID, never its index (indices move when GPUs come and go); the
  index is kept only to name a GPU that is gone.
* Only ``forget`` removes a row; a GPU that is gone keeps its row (reported, not an error).

Used from the journal's thread (the daemon's executor), like the rest of the store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from agent.store import Store, audit


class DesiredOutcome(StrEnum):
    """What the last apply or check of a GPU's desired layout found."""

    APPLYING = "applying"  # recorded; the apply that recorded it has not finished
    APPLIED = "applied"  # the apply changed the GPU to it
    MATCHES = "matches"  # the GPU had it already: nothing was changed
    WAITING_FOR_RESET = "waiting_for_reset"  # its MIG mode is set, in effect after a GPU reset
    BLOCKED = "blocked"  # a lease or a held instance stands in the way (never destroyed)
    FAILED = "failed"  # the apply failed (a hook, the hardware)
    DIFFERS = "differs"  # checked at start-up without re-applying (reapply_at_start off)
    GONE = "gone"  # the GPU is not on the node


@dataclass(frozen=True)
class DesiredLayout:
    gpu_uuid: str
    gpu_index: int
    mig_enabled: bool
    counts: Mapping[str, int] = field(default_factory=dict)
    recorded_at: float = 0.0
    recorded_by: str = ""
    outcome: DesiredOutcome = DesiredOutcome.APPLYING
    outcome_detail: str = ""
    checked_at: float | None = None

    @property
    def clear(self) -> bool:
        """MIG on with no instances at all."""
        return self.mig_enabled and not any(self.counts.values())

    def describe(self) -> str:
        if not self.mig_enabled:
            return "MIG off"
        if self.clear:
            return "MIG on, no instances (--clear)"
        return " ".join(f"{name}={count}" for name, count in sorted(self.counts.items()))


def _from_row(row: Any) -> DesiredLayout:
    return DesiredLayout(
        gpu_uuid=row["gpu_uuid"],
        gpu_index=row["gpu_index"],
        mig_enabled=bool(row["mig_enabled"]),
        counts={str(k): int(v) for k, v in json.loads(row["counts"]).items()},
        recorded_at=row["recorded_at"],
        recorded_by=row["recorded_by"],
        outcome=DesiredOutcome(row["outcome"]),
        outcome_detail=row["outcome_detail"],
        checked_at=row["checked_at"],
    )


def desired_layouts(store: Store) -> list[DesiredLayout]:
    # Same package: the desired layout is part of the journal.
    rows = store._db.execute(
        "SELECT * FROM desired_layouts ORDER BY gpu_index, gpu_uuid"
    ).fetchall()
    return [_from_row(row) for row in rows]


def record(store: Store, layouts: Sequence[DesiredLayout], recorded_by: str) -> None:
    """Record (replace) the desired layout of each GPU of ``layouts``, outcome 'applying'."""
    now = time.time()
    with store.transaction() as db:
        for layout in layouts:
            counts = {name: count for name, count in layout.counts.items() if count > 0}
            db.execute(
                "INSERT INTO desired_layouts (gpu_uuid, gpu_index, mig_enabled, counts, "
                "recorded_at, recorded_by, outcome, outcome_detail, checked_at) "
                "VALUES (?, ?, ?, ?, ?, ?, 'applying', '', NULL) "
                "ON CONFLICT(gpu_uuid) DO UPDATE SET gpu_index = excluded.gpu_index, "
                "mig_enabled = excluded.mig_enabled, counts = excluded.counts, "
                "recorded_at = excluded.recorded_at, recorded_by = excluded.recorded_by, "
                "outcome = excluded.outcome, outcome_detail = '', checked_at = NULL",
                (layout.gpu_uuid, layout.gpu_index, int(layout.mig_enabled),
                 json.dumps(counts, sort_keys=True), now, recorded_by),
            )  # fmt: skip
        audit.append(
            db, "layout.desired", outcome="recorded",
            detail={"gpus": {layout.gpu_uuid: layout.describe() for layout in layouts}},
        )  # fmt: skip


def set_outcomes(store: Store, outcomes: Mapping[str, tuple[DesiredOutcome, str]]) -> None:
    """GPU UUID -> (outcome, detail) of the last apply or check; GPUs without a row are
    skipped (their desired layout was forgotten meanwhile)."""
    if not outcomes:
        return
    now = time.time()
    with store.transaction() as db:
        for gpu_uuid, (outcome, detail) in outcomes.items():
            db.execute(
                "UPDATE desired_layouts SET outcome = ?, outcome_detail = ?, checked_at = ? "
                "WHERE gpu_uuid = ?",
                (DesiredOutcome(outcome).value, detail[:4096], now, gpu_uuid),
            )


def forget(store: Store, gpu_uuids: Collection[str] | None) -> list[str]:
    """Remove the desired layout of ``gpu_uuids`` (None: every GPU); the UUIDs removed."""
    with store.transaction() as db:
        known = [str(row[0]) for row in db.execute("SELECT gpu_uuid FROM desired_layouts")]
        gone = sorted(known if gpu_uuids is None else set(known) & set(gpu_uuids))
        db.executemany("DELETE FROM desired_layouts WHERE gpu_uuid = ?", [(u,) for u in gone])
        if gone:
            audit.append(db, "layout.desired_forgotten", outcome="forgotten",
                         detail={"gpus": gone})  # fmt: skip
    return gone
