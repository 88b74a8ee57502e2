"""The journal's records and the lease state machine's states, as plain values."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class PartitionState(StrEnum):
    FREE = "free"
    LEASED = "leased"
    RELEASING = "releasing"
    SCRUBBING = "scrubbing"
    QUARANTINED = "quarantined"


class LeaseState(StrEnum):
    GRANTING = "granting"
    ACTIVE = "active"
    RELEASING = "releasing"
    RELEASED = "released"
    # The partition vanished or changed identity under the lease (DESIGN.md invariant 6): its
    # fence was revoked and its holders evicted; terminal, like released.
    LOST = "lost"

    @property
    def live(self) -> bool:
        """The one meaning of "live": the lease may still hold, or be giving back, a partition."""
        return self in (LeaseState.GRANTING, LeaseState.ACTIVE, LeaseState.RELEASING)


LIVE_LEASE_STATES = tuple(state.value for state in LeaseState if state.live)


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
    identity: str = ""


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
    # (kind, major, minor, path) of every node the lease was fenced to, fixed at grant time.
    nodes: tuple[tuple[str, int, int, str], ...] = ()
    outcome: str = ""

    @property
    def live(self) -> bool:
        return LeaseState(self.state).live


@dataclass(frozen=True)
class SyncResult:
    """What an inventory refresh changed in the journal."""

    new: list[str] = field(default_factory=list)
    # Partitions that vanished from the hardware, or came back / changed identity: their clean
    # flag died with the identity it belonged to (DESIGN.md invariant 6).
    vanished: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LayoutJournalEntry:
    id: int
    gpu_uuid: str
    plan: dict[str, Any]
    status: str
    detail: str
    started_at: float
    finished_at: float | None


def partition_from_row(row: sqlite3.Row) -> PartitionRecord:
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
        identity=row["identity"],
    )


def lease_from_row(row: sqlite3.Row) -> LeaseRecord:
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
        nodes=tuple(
            (str(kind), int(major), int(minor), str(path))
            for kind, major, minor, path in json.loads(row["nodes"])
        ),
        outcome=row["outcome"],
    )
