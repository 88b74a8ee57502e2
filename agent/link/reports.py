"""Report kinds of the link, their priorities, and builders from the agent's own records.

A report's kind is the name of the ``Report.body`` oneof member it sets. Health samples and
inventory snapshots may be dropped when the outbox is full (a newer one supersedes them); the
other kinds are never dropped: lease and partition events, scrub certificates, attestation
evidence, command results and audit checkpoints are what an operator or an auditor relies on.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any, Final, Protocol

from agent.errors import LinkProtocolError
from agent.proto.accelguard.v1 import link_pb2 as pb
from agent.scrub.certificate import ALGORITHM, canonical_json
from agent.store import LeaseRecord, PartitionRecord
from agent.store.health import HealthEventRecord


class ReportKind(StrEnum):
    INVENTORY = "inventory"
    LEASE = "lease"
    PARTITION = "partition"
    SCRUB_CERTIFICATE = "scrub_certificate"
    HEALTH = "health"
    ATTESTATION = "attestation"
    COMMAND_RESULT = "command_result"
    AUDIT_CHECKPOINT = "audit_checkpoint"
    HEALTH_EVENT = "health_event"

    @property
    def droppable(self) -> bool:
        return self in DROPPABLE_KINDS


DROPPABLE_KINDS: Final = frozenset({ReportKind.HEALTH, ReportKind.INVENTORY})
# A lease entering these states starts holding a partition: its events from here on need room
# in the outbox, so such a report must leave the grant reserve free (agent/store.py Outbox).
LEASE_OPENING_STATES: Final = frozenset({"granting"})


def kind_of(report: pb.Report) -> ReportKind:
    body = report.WhichOneof("body")
    if body is None:
        raise LinkProtocolError("report has no body")
    return ReportKind(body)


def opens_lease(report: pb.Report) -> bool:
    return report.WhichOneof("body") == "lease" and report.lease.state in LEASE_OPENING_STATES


class ReportSink(Protocol):
    """Where the node's services hand reports to the link (the outbox, then the controller).

    ``publish`` returns once the report is durably in the outbox. For the never-dropped kinds it
    raises :class:`~agent.errors.OutboxFullError` when that is impossible; a lease event in state
    ``granting`` also raises it when the room kept for leases already granted would be used, so
    the caller refuses the grant instead of losing its events later.
    """

    async def publish(self, report: pb.Report) -> int | None: ...


# --- builders ----------------------------------------------------------------------------------


def lease_event(lease: LeaseRecord, reason: str = "") -> pb.Report:
    return pb.Report(
        lease=pb.LeaseEvent(
            lease_id=lease.id,
            partition_uuid=lease.partition_uuid,
            tenant=lease.tenant,
            state=lease.state,
            reason=reason or lease.release_reason,
            expires_at=lease.expires_at or 0.0,
            outcome=lease.outcome,
        )
    )


def partition_event(partition: PartitionRecord) -> pb.Report:
    return pb.Report(
        partition=pb.PartitionEvent(
            partition_uuid=partition.uuid,
            state=partition.state,
            clean=partition.clean,
            reason=partition.reason,
            lease_id=partition.lease_id or "",
        )
    )


def scrub_certificate(document: Mapping[str, Any]) -> pb.Report:
    """A signed certificate document (agent/scrub/certificate.py) as a report: the canonical
    payload bytes and the raw signature, which is exactly what was signed."""
    try:
        signature = base64.b64decode(str(document["signature"]), validate=True)
        payload = canonical_json(document["payload"])
    except (KeyError, binascii.Error, ValueError) as error:
        raise LinkProtocolError(f"scrub certificate document is malformed: {error}") from error
    return pb.Report(
        scrub_certificate=pb.ScrubCertificate(
            canonical_payload=payload,
            signature=signature,
            algorithm=str(document.get("algorithm", ALGORITHM)),
        )
    )


class GpuLike(Protocol):
    @property
    def index(self) -> int: ...
    @property
    def uuid(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def serial(self) -> str: ...
    @property
    def mig_current(self) -> bool | None: ...
    @property
    def mig_pending(self) -> bool | None: ...
    @property
    def memory_total_bytes(self) -> int: ...
    @property
    def vendor(self) -> str: ...


def inventory_snapshot(
    driver_version: str,
    gpus: Iterable[GpuLike],
    partitions: Iterable[PartitionRecord],
    gpu_health: Mapping[str, tuple[str, bool]] | None = None,
) -> pb.Report:
    """``gpu_health``: GPU UUID -> (state, reset required) from the health monitor; a GPU it does
    not name is healthy."""
    health = gpu_health or {}
    return pb.Report(
        inventory=pb.InventorySnapshot(
            driver_version=driver_version,
            gpus=[
                pb.InventoryGpu(
                    index=gpu.index,
                    uuid=gpu.uuid,
                    name=gpu.name,
                    serial=gpu.serial,
                    mig_current=bool(gpu.mig_current),
                    mig_pending=bool(gpu.mig_pending),
                    memory_total_bytes=gpu.memory_total_bytes,
                    health=health.get(gpu.uuid, ("healthy", False))[0],
                    reset_required=health.get(gpu.uuid, ("healthy", False))[1],
                    vendor=gpu.vendor,
                )
                for gpu in gpus
            ],
            partitions=[
                pb.InventoryPartition(
                    uuid=p.uuid,
                    kind=p.kind,
                    gpu_index=p.gpu_index,
                    profile=p.profile,
                    state=p.state,
                    clean=p.clean,
                    reason=p.reason,
                    lease_id=p.lease_id or "",
                )
                for p in partitions
                if p.present
            ],
        )
    )


def health_event(record: HealthEventRecord) -> pb.Report:
    return pb.Report(
        health_event=pb.HealthEvent(
            event_id=record.id, at=record.at, gpu_uuid=record.gpu_uuid,
            gpu_index=record.gpu_index, kind=record.kind, code=max(record.code, 0),
            gi_id=-1 if record.gi_id is None else record.gi_id,
            ci_id=-1 if record.ci_id is None else record.ci_id,
            action=record.action, reset_required=record.reset_required,
            detail=record.detail, partitions=list(record.partitions),
        )
    )  # fmt: skip


def health_sample(
    uptime_s: float,
    outbox_depth: int,
    dropped: int,
    gpus: Iterable[tuple[str, float, float, int]] = (),
) -> pb.Report:
    """``gpus``: (UUID, temperature in C, power in W, XIDs seen) per GPU the monitor read."""
    return pb.Report(
        health=pb.HealthSample(
            uptime_s=uptime_s, outbox_depth=outbox_depth, dropped_samples=dropped,
            gpus=[
                pb.GpuHealth(uuid=uuid, temperature_c=temperature, power_w=power, xid_events=xids)
                for uuid, temperature, power, xids in gpus
            ],
        )
    )  # fmt: skip
