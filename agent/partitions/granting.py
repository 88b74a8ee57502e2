"""A grant: a free, clean partition to one tenant, fenced to exactly its nodes, with a CDI spec.

Two trips to the worker thread (a grant's latency is mostly such trips):

1. every check (tenant cgroup not nested, fenceable, the partition free and clean, its GPU's mode
   settled, no node of it allowed by another live fence), then the journal's ``granting`` row,
   committed to disk before anything is fenced (invariant 4);
2. the fence, the CDI spec, then the lease's activation behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.errors import (
    AccelguardError,
    OutboxFullError,
    RetryLaterError,
    StoreError,
    ValidationError,
)
from agent.hw.devnodes import DeviceNode, own_nodes
from agent.isolation import cdi, fence_for
from agent.isolation.cgroups import resolve_tenant_cgroup
from agent.isolation.driver_files import host_search
from agent.isolation.survey import SurveyedFence
from agent.partitions.context import PartitionContext
from agent.partitions.fencing import TenantFences
from agent.partitions.selection import check_mode_settled, select_partition
from agent.runtime import failpoints
from agent.runtime.durations import human_duration
from agent.runtime.failpoints import CrashPoint, Fault
from agent.scrub.model import POLICY_PATTERNS
from agent.store import LeaseRecord, PartitionRecord

log = structlog.get_logger(__name__)

_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")


@dataclass(frozen=True)
class Grant:
    lease: LeaseRecord
    partition: PartitionRecord
    device_nodes: tuple[DeviceNode, ...]
    cdi_device: str  # the CDI name a container runtime is asked for


class Granter:
    """Grants leases, one at a time (``lock``: binds take it too, as they check exclusivity)."""

    def __init__(
        self,
        ctx: PartitionContext,
        fences: TenantFences,
        retire: Callable[[str, str], Awaitable[PartitionRecord]],
        ready: asyncio.Event,
    ) -> None:
        self._ctx = ctx
        self._fences = fences
        self._retire = retire
        self._ready = ready
        self.lock = asyncio.Lock()

    async def grant(
        self,
        tenant: str,
        cgroup: str,
        partition_uuid: str = "",
        profile: str = "",
        ttl_s: float = 0.0,
        scrub_policy: str = "",
        bind_later: bool = False,
    ) -> Grant:
        """``bind_later``: no cgroup yet (``cgroup`` empty); ``bind`` fences it when it exists."""
        if not _TENANT.fullmatch(tenant):
            raise ValidationError(
                f"tenant {tenant!r}: use 1-128 letters, digits and . _ @ : - (starting with a "
                "letter or digit)"
            )
        if bool(partition_uuid) == bool(profile):
            raise ValidationError("name either a partition UUID or a profile, not both or neither")
        if not math.isfinite(ttl_s) or ttl_s < 0 or ttl_s > self._ctx.config.leases.max_ttl_s:
            raise ValidationError(
                f"ttl {human_duration(ttl_s)}: must be between 0 (no expiry) and "
                f"{human_duration(self._ctx.config.leases.max_ttl_s)} (leases.max_ttl_s)"
            )
        if scrub_policy and scrub_policy not in POLICY_PATTERNS:
            raise ValidationError(
                f"scrub policy {scrub_policy!r}: use one of {', '.join(POLICY_PATTERNS)}"
            )
        if bind_later and cgroup:
            raise ValidationError("a lease bound later takes no cgroup now: `lease bind` names it")
        path = (
            ""
            if bind_later
            else str(resolve_tenant_cgroup(cgroup, self._ctx.config.tenants.cgroup_parents))
        )
        if not self._ready.is_set():
            raise RetryLaterError("the agent is still reconciling after start-up; retry shortly")
        async with self.lock:
            lease_id = f"lease-{uuidlib.uuid4().hex[:16]}"
            expires = time.time() + ttl_s if ttl_s else None
            cdi_dir = self._ctx.config.leases.cdi_dir
            search = host_search(self._ctx.config.nvml.library)

            def take() -> tuple[PartitionRecord, list[DeviceNode], bool]:
                """Every check, then the journal's grant: one trip to the worker thread."""
                live = self._ctx.store.leases(live_only=True)
                partitions = self._ctx.store.partitions()
                if path:
                    self._fences.check_not_nested(path, live)
                    self._fences.check_fenceable(Path(path))
                record = select_partition(partition_uuid, profile, partitions)
                check_mode_settled(self._ctx.gpu(record))
                nodes = self._ctx.nodes(record)
                self._fences.check_exclusive(
                    record, nodes, path, self._fences.mig_cgroups(live, partitions)
                )
                return (
                    record,
                    nodes,
                    self._ctx.store.begin_grant(
                        lease_id,
                        record.uuid,
                        tenant,
                        path,
                        expires,
                        scrub_policy,
                        [(n.kind, n.major, n.minor, str(n.path)) for n in nodes],
                    ),
                )

            record, nodes, taken = await self._ctx.executor.call(take)
            # Bound for the rest of this request's task (its log lines carry who and what).
            structlog.contextvars.bind_contextvars(
                lease=lease_id, partition=record.uuid, tenant=tenant, gpu=record.gpu_index
            )
            if not taken:
                raise RetryLaterError(f"partition {record.uuid} was taken concurrently; retry")
            try:
                # Upstream must be able to hear of this lease for its whole life: if its first
                # event cannot be kept, the grant is refused before anything is fenced.
                await self._ctx.report_lease(lease_id, must_keep=True)
            except OutboxFullError:
                await self._ctx.executor.call(
                    self._ctx.store.undo_grant, lease_id, "the link outbox is full"
                )
                raise
        log.info(
            "lease_granting", lease=lease_id, partition=record.uuid, tenant=tenant, cgroup=path
        )
        failpoints.hit(CrashPoint.LEASE_GRANT_AFTER_JOURNAL)
        if path and failpoints.active(Fault.GRANT_CGROUP_REMOVED):
            with contextlib.suppress(OSError):
                Path(path).rmdir()
        async with self._ctx.locks[record.uuid]:
            try:

                def publish() -> tuple[LeaseRecord | None, PartitionRecord | None]:
                    """Behind the fence, in its worker trip: CDI spec, activation, the rows to
                    answer with."""
                    failpoints.hit(CrashPoint.LEASE_GRANT_AFTER_FENCE)
                    cdi.write_spec(cdi_dir, lease_id, nodes, record.uuid, search)
                    failpoints.hit(CrashPoint.LEASE_GRANT_AFTER_CDI)
                    if not self._ctx.store.activate_lease(lease_id):
                        raise StoreError(f"lease {lease_id} changed state while being granted")
                    return self._ctx.store.lease(lease_id), self._ctx.store.partition(record.uuid)

                lease, granted = await self._fences.fence_then(path, publish)
                await self._ctx.report_lease(lease_id)
            except AccelguardError as error:
                log.error("lease_grant_failed", lease=lease_id, error=str(error))  # noqa: TRY400
                await self._abandon(lease_id, record, nodes, path, error)
                raise
        if lease is None or granted is None:  # pragma: no cover - written above
            raise StoreError(f"lease {lease_id} vanished from the journal")
        log.info("lease_granted", lease=lease_id, partition=record.uuid, tenant=tenant)
        return Grant(
            lease=lease,
            partition=granted,
            device_nodes=tuple(nodes),
            cdi_device=cdi.device_name(lease_id),
        )

    async def _abandon(
        self,
        lease_id: str,
        record: PartitionRecord,
        nodes: list[DeviceNode],
        cgroup: str,
        error: AccelguardError,
    ) -> None:
        """Undo a failed grant. If the kernel shows the tenant's cgroup never could open the
        partition's own nodes, it is still clean and goes back untouched; otherwise (or if in
        doubt) it is released like any lease: revoke, evict, scrub."""
        own = own_nodes(nodes)
        reachable = True
        with contextlib.suppress(AccelguardError):
            path = Path(cgroup)
            state = await self._ctx.executor.call(fence_for(path).current, path)
            if state is not None and state.allowed is not None:
                fence = SurveyedFence(cgroup, state)
                reachable = any(fence.allows(n.kind, n.major, n.minor) for n in own)
        if not reachable:
            try:
                await self._ctx.executor.call(
                    self._ctx.store.undo_grant, lease_id, f"grant failed: {error}"
                )
                await self._ctx.executor.call(
                    cdi.remove_spec, self._ctx.config.leases.cdi_dir, lease_id
                )
            except AccelguardError as undo_error:
                log.error("lease_grant_undo_failed", lease=lease_id, error=str(undo_error))  # noqa: TRY400
            else:
                log.info("lease_grant_undone", lease=lease_id, partition=record.uuid)
                await self._ctx.report_lease(lease_id)
                return
        await self._retire(lease_id, f"grant failed: {error}")
