"""GPU health in the journal (migration 7): every health event, the holds it put on partitions,
and each GPU's last counters (to find what happened while the agent was down).

A **hold** is what makes a health quarantine final: a partition with a hold is never made free,
whatever scrub succeeds on it (agent/partitions/sanitize.py), until an operator clears it
(``partition clear``). Used from the journal's thread, like the rest of the store.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from agent.store import Store, audit, put_meta


@dataclass(frozen=True)
class HealthEventRecord:
    id: int
    at: float
    gpu_uuid: str
    gpu_index: int
    kind: str  # xid, ecc_dbe, remap_failure, remap_pending, lost, unreadable, temperature
    code: int  # the XID, the counter's new value, ...
    gi_id: int | None
    ci_id: int | None
    action: str  # quarantine_gpu, quarantine_instance, lease_event, ignore, report
    reset_required: bool
    detail: str
    partitions: tuple[str, ...]


@dataclass(frozen=True)
class HealthHold:
    partition_uuid: str
    event_id: int
    reason: str
    at: float


@dataclass(frozen=True)
class GpuCounters:
    gpu_uuid: str
    ecc_aggregate_dbe: int
    remapped_uncorrectable: int
    remap_failure: bool
    updated_at: float
    retired_dbe: int = 0  # pages retired for double-bit errors (before Ampere)


def _event(row: Any) -> HealthEventRecord:
    return HealthEventRecord(
        id=int(row["id"]), at=float(row["at"]), gpu_uuid=str(row["gpu_uuid"]),
        gpu_index=int(row["gpu_index"]), kind=str(row["kind"]), code=int(row["code"]),
        gi_id=None if row["gi_id"] is None else int(row["gi_id"]),
        ci_id=None if row["ci_id"] is None else int(row["ci_id"]),
        action=str(row["action"]), reset_required=bool(row["reset_required"]),
        detail=str(row["detail"]), partitions=tuple(json.loads(row["partitions"])),
    )  # fmt: skip


class HealthLog:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._db = store._db  # same package: part of the journal

    def record(
        self,
        *,
        gpu_uuid: str,
        gpu_index: int,
        kind: str,
        code: int,
        action: str,
        detail: str,
        partitions: list[str],
        hold: bool,
        reset_required: bool = False,
        gi_id: int | None = None,
        ci_id: int | None = None,
    ) -> HealthEventRecord:
        """Journal an event and, with ``hold``, a hold on each of its partitions, in one
        transaction: journaled before anything acts on it."""
        now = time.time()
        with self._store.transaction() as db:
            cursor = db.execute(
                "INSERT INTO health_events (at, gpu_uuid, gpu_index, kind, code, gi_id, ci_id, "
                "action, reset_required, detail, partitions) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, "
                "?, ?)",
                (now, gpu_uuid, gpu_index, kind, code, gi_id, ci_id, action, int(reset_required),
                 detail, json.dumps(sorted(partitions))),
            )  # fmt: skip
            event_id = int(cursor.lastrowid or 0)
            if hold:
                for uuid in partitions:
                    db.execute(
                        "INSERT INTO health_holds (partition_uuid, event_id, reason, at) "
                        "VALUES (?, ?, ?, ?) ON CONFLICT(partition_uuid) DO NOTHING",
                        (uuid, event_id, detail, now),
                    )
            if reset_required:
                put_meta(db, f"health_reset_required:{gpu_uuid}", "1")
            audit.append(
                db, "health.event", outcome=action,
                detail={"event_id": event_id, "gpu_uuid": gpu_uuid, "kind": kind, "code": code,
                        "gi_id": gi_id, "ci_id": ci_id, "reset_required": reset_required,
                        "held": sorted(partitions) if hold else [], "detail": detail},
            )  # fmt: skip
            row = db.execute("SELECT * FROM health_events WHERE id = ?", (event_id,)).fetchone()
        return _event(row)

    def events(self, limit: int = 50, gpu_uuid: str = "") -> list[HealthEventRecord]:
        if gpu_uuid:
            rows = self._db.execute(
                "SELECT * FROM health_events WHERE gpu_uuid = ? ORDER BY id DESC LIMIT ?",
                (gpu_uuid, limit),
            ).fetchall()
        else:
            rows = self._db.execute(
                "SELECT * FROM health_events ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_event(r) for r in rows]

    def hold(self, partition_uuid: str) -> HealthHold | None:
        row = self._db.execute(
            "SELECT partition_uuid, event_id, reason, at FROM health_holds "
            "WHERE partition_uuid = ?",
            (partition_uuid,),
        ).fetchone()
        if row is None:
            return None
        return HealthHold(str(row[0]), int(row[1]), str(row[2]), float(row[3]))

    def holds(self) -> list[HealthHold]:
        rows = self._db.execute(
            "SELECT partition_uuid, event_id, reason, at FROM health_holds ORDER BY at"
        ).fetchall()
        return [HealthHold(str(r[0]), int(r[1]), str(r[2]), float(r[3])) for r in rows]

    def release_hold(self, partition_uuid: str) -> bool:
        """An operator cleared the partition (``partition clear``)."""
        with self._store.transaction() as db:
            released = bool(
                db.execute(
                    "DELETE FROM health_holds WHERE partition_uuid = ?", (partition_uuid,)
                ).rowcount
            )
            if released:
                audit.append(db, "health.hold_released", partition_uuid=partition_uuid)
            return released

    def reset_required(self, gpu_uuid: str) -> bool:
        return self._store.get_meta(f"health_reset_required:{gpu_uuid}") == "1"

    def clear_reset_required(self, gpu_uuid: str) -> None:
        self._store.set_meta(f"health_reset_required:{gpu_uuid}", "0")

    # -- counters ------------------------------------------------------------------------------

    def counters(self, gpu_uuid: str) -> GpuCounters | None:
        row = self._db.execute(
            "SELECT gpu_uuid, ecc_aggregate_dbe, remapped_uncorrectable, remap_failure, "
            "updated_at, retired_dbe FROM health_counters WHERE gpu_uuid = ?",
            (gpu_uuid,),
        ).fetchone()
        if row is None:
            return None
        return GpuCounters(
            str(row[0]), int(row[1]), int(row[2]), bool(row[3]), float(row[4]), int(row[5])
        )

    def save_counters(self, counters: GpuCounters) -> None:
        with self._store.transaction() as db:
            db.execute(
                "INSERT INTO health_counters (gpu_uuid, ecc_aggregate_dbe, "
                "remapped_uncorrectable, remap_failure, updated_at, retired_dbe) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(gpu_uuid) DO UPDATE SET "
                "ecc_aggregate_dbe = excluded.ecc_aggregate_dbe, "
                "remapped_uncorrectable = excluded.remapped_uncorrectable, "
                "remap_failure = excluded.remap_failure, updated_at = excluded.updated_at, "
                "retired_dbe = excluded.retired_dbe",
                (counters.gpu_uuid, counters.ecc_aggregate_dbe, counters.remapped_uncorrectable,
                 int(counters.remap_failure), counters.updated_at, counters.retired_dbe),
            )  # fmt: skip
