"""vNPUs whose memory the agent cannot see: a clean flag that one of them cannot keep.

A MIG instance's identity names its placement, so one re-created on other memory is a new
identity and dirty (invariant 6). A vNPU's names the memory units it owns only where the library
reports them (dcmi-sim); with Huawei's ``libdcmi`` its identity ends in ``units 0x0`` and says
nothing about where its memory is. Two vNPUs of one NPU destroyed behind the agent's back, one
clean and one holding a tenant's data, and the clean one re-created with the same vdev id and
template on the other's memory, would look unchanged and keep their clean flag. So when a vNPU
without known units vanishes while not clean, every present vNPU of that NPU whose units are
unknown is dirty from then on, and treated as changed (a lease on one is lost): it may sit on
the memory that vanished.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Mapping

from agent.store import audit as audit_log

_UNKNOWN_UNITS = " units 0x0"


def vnpu_identity(npu_uuid: str, vdev_id: int, template: str, units: Collection[int]) -> str:
    """A vNPU's identity in the journal (the inventory writes it, ``taint_unplaced_siblings``
    reads it): its memory units as a mask, ``0x0`` when the library reports none."""
    mask = sum(1 << unit for unit in units)
    return f"npu {npu_uuid} vNPU {vdev_id} template {template} units {mask:#x}"


def _units_unknown(identity: str | None) -> bool:
    return (identity or "").endswith(_UNKNOWN_UNITS)


def taint_unplaced_siblings(
    db: sqlite3.Connection,
    known: Mapping[str, sqlite3.Row],
    vanished: Collection[str],
    skip: Collection[str],
    now: float,
) -> list[str]:
    """Inside ``Store.sync_partitions``' transaction: mark the vNPUs above dirty (those in
    ``skip`` are already); returns their UUIDs. ``known`` rows carry kind, clean, gpu_uuid and
    identity as they were before this refresh."""
    tainted = {
        row["gpu_uuid"]
        for uuid in vanished
        if (row := known[uuid])["kind"] == "vnpu"
        and not row["clean"]
        and _units_unknown(row["identity"])
    }
    if not tainted:
        return []
    siblings = [
        row["uuid"]
        for row in db.execute(
            "SELECT uuid, gpu_uuid, identity FROM partitions WHERE present = 1 AND kind = 'vnpu'"
        )
        if row["gpu_uuid"] in tainted
        and _units_unknown(row["identity"])
        and row["uuid"] not in skip
    ]
    for uuid in siblings:
        db.execute(
            "UPDATE partitions SET clean = 0, updated_at = ?, "
            "reason = CASE WHEN state = 'quarantined' THEN reason ELSE ? END WHERE uuid = ?",
            (now, "a vNPU of this NPU vanished holding data, and where its memory went is "
             "unknown (the library reports no memory units): memory state unknown", uuid),
        )  # fmt: skip
        audit_log.append(
            db, "partition.changed", outcome="dirty", partition_uuid=uuid,
            detail={"why": "sibling vNPU vanished dirty, memory units unknown"},
        )  # fmt: skip
    return siblings
