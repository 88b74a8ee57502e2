"""Revocation's second half: after the fence is off, no process may still hold the partition
(invariant 3: an open descriptor survives a fence change). The rules of who is killed and who is
only logged live in ``agent.isolation.evict``; this module asks it about one lease's partition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog

from agent.errors import AccelguardError
from agent.hw.devnodes import own_nodes
from agent.isolation.evict import EvictionReport, Evictor
from agent.partitions.context import PartitionContext
from agent.store import LeaseRecord, PartitionRecord

log = structlog.get_logger(__name__)


class Revoker:
    def __init__(self, context: PartitionContext, evictor: Evictor) -> None:
        self._ctx = context
        self._evictor = evictor

    async def evict(self, record: PartitionRecord, lease: LeaseRecord) -> None:
        nodes = self._ctx.nodes(record)
        others = [
            other
            for other in await self._ctx.leases(live_only=True)
            if other.cgroup == lease.cgroup and other.id != lease.id
        ]
        # An unbound lease has no cgroup: every holder is a stray (NVML's are evicted).
        cgroup = Path(lease.cgroup) if lease.cgroup else None
        try:
            report = await self._evictor.evict(
                own_nodes(nodes),
                nodes,
                cgroup if cgroup is not None and cgroup.is_dir() else None,
                kill_whole_cgroup=not others,
                nvml_holders=lambda: self.nvml_holders(record),
            )
        except AccelguardError as error:
            await self._ctx.audit(
                "eviction", outcome="failed", lease_id=lease.id, partition_uuid=record.uuid,
                detail={"cgroup": lease.cgroup, "error": str(error)},
            )  # fmt: skip
            raise
        await self._ctx.audit(
            "eviction", lease_id=lease.id, partition_uuid=record.uuid,
            detail={"cgroup": lease.cgroup, **_counts(report)},
        )  # fmt: skip
        if report.terminated or report.killed:
            log.info(
                "lease_evicted", lease=lease.id, partition=record.uuid,
                terminated=report.terminated, killed=report.killed, outsiders=report.outsiders,
            )  # fmt: skip

    async def evict_strays(self, record: PartitionRecord) -> None:
        """Before a quarantined partition is scrubbed again: no process may hold it. There is no
        tenant cgroup any more; NVML-listed holders are killed, anyone else holding its own
        nodes fails the clear (EvictionError), like a release."""
        nodes = self._ctx.nodes(record)
        try:
            report = await self._evictor.evict(
                own_nodes(nodes), nodes, None, kill_whole_cgroup=False,
                nvml_holders=lambda: self.nvml_holders(record),
            )  # fmt: skip
        except AccelguardError as error:
            await self._ctx.audit(
                "eviction", outcome="failed", partition_uuid=record.uuid,
                detail={"error": str(error)},
            )  # fmt: skip
            raise
        await self._ctx.audit("eviction", partition_uuid=record.uuid, detail=_counts(report))
        if report.terminated or report.killed:
            log.info(
                "strays_evicted", partition=record.uuid, terminated=report.terminated,
                killed=report.killed,
            )  # fmt: skip

    async def nvml_holders(self, record: PartitionRecord) -> set[int]:
        if record.kind not in ("gpu", "mig"):
            return set()  # NVML knows only NVIDIA's processes; the fd scan finds the others
        processes = await self._ctx.executor.call(
            self._ctx.backend.running_processes, record.gpu_index
        )
        if record.kind == "gpu":
            return {pid for pid, _, _ in processes}
        return {pid for pid, gi, ci in processes if gi == record.gi_id and ci == record.ci_id}


def _counts(report: EvictionReport) -> dict[str, Any]:
    return {
        "terminated": sorted(report.terminated),
        "killed": sorted(report.killed),
        "outsiders": sorted(report.outsiders),
        "shared_holders": sorted(report.shared_holders),
    }
