"""Which partition a grant takes: named by UUID or chosen by profile, and whether it may be
granted now (free and clean, its GPU's MIG mode settled)."""

from __future__ import annotations

from agent.errors import NotFoundError, RetryLaterError, ValidationError
from agent.hw.model import DeviceInfo
from agent.store import PartitionRecord, PartitionState

WHOLE_GPU_PROFILE = "gpu"


def check_mode_settled(gpu: DeviceInfo) -> None:
    if gpu.reset_required:
        pending = "on" if gpu.mig_pending else "off"
        raise ValidationError(
            f"GPU {gpu.index} has a pending MIG mode change (to {pending}): its partitions "
            "change at the next GPU reset, so none is granted until then"
        )


def select_partition(
    partition_uuid: str, profile: str, partitions: list[PartitionRecord]
) -> PartitionRecord:
    if partition_uuid:
        named = [p for p in partitions if p.uuid == partition_uuid]
        if not named:
            raise NotFoundError(f"partition {partition_uuid} does not exist on this node")
        check_grantable(named[0])
        return named[0]
    candidates = [
        record
        for record in partitions
        if (record.kind == "gpu" if profile == WHOLE_GPU_PROFILE else record.profile == profile)
    ]
    for record in candidates:
        if record.state == "free" and record.clean:
            return record
    if not candidates:
        raise NotFoundError(f"no partition with profile {profile!r} on this node")
    states = ", ".join(sorted({state_text(r) for r in candidates}))
    if all(r.state == PartitionState.QUARANTINED for r in candidates):
        raise ValidationError(
            f"no free clean partition with profile {profile!r}: all quarantined ({states})"
        )
    raise RetryLaterError(f"no free clean partition with profile {profile!r} yet ({states})")


def state_text(record: PartitionRecord) -> str:
    if record.state == "free":
        return "free" if record.clean else "dirty, awaiting scrub"
    return record.state


def check_grantable(record: PartitionRecord) -> None:
    if record.state == "leased":
        raise ValidationError(f"partition {record.uuid} is leased ({record.lease_id})")
    if record.state == "quarantined":
        raise ValidationError(f"partition {record.uuid} is quarantined: {record.reason}")
    if record.state in ("releasing", "scrubbing"):
        raise RetryLaterError(f"partition {record.uuid} is {record.state}; not grantable yet")
    if not record.clean:
        raise RetryLaterError(f"partition {record.uuid} is dirty (awaiting scrub)")
