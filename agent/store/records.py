"""The journal's records and the lease state machine's states, as plain values."""

from __future__ import annotations

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
