"""``lease bind``: give a lease granted with ``--bind-later`` its tenant cgroup once it exists.

A Slurm job's lease is granted by its Prolog, before Slurm creates the job's cgroup; the grant
already refuses a dirty or quarantined partition and takes it from every other tenant. The bind
applies the checks a grant with a cgroup makes (an allowed parent, no nesting, no node in two
fences, cgroup v1 without children) and then the fence. A bind whose fence cannot be applied ends
the lease the safe way: revoke, evict, scrub (``retire``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog

from agent.errors import AccelguardError, NotFoundError, RetryLaterError, ValidationError
from agent.isolation.cgroups import resolve_tenant_cgroup
from agent.partitions.context import PartitionContext
from agent.partitions.fencing import TenantFences
from agent.store import LeaseRecord, PartitionRecord
from agent.store.bindings import bind_lease

log = structlog.get_logger(__name__)


async def bind(
    ctx: PartitionContext,
    fences: TenantFences,
    retire: Callable[[str, str], Awaitable[PartitionRecord]],
    lease_id: str,
    cgroup: str,
) -> LeaseRecord:
    """Bind the lease to ``cgroup`` and fence it; idempotent for the cgroup it already has.
    Caller holds the grant lock (grants and binds check exclusivity one at a time)."""
    path = resolve_tenant_cgroup(cgroup, ctx.config.tenants.cgroup_parents)
    lease = await ctx.executor.call(ctx.store.lease, lease_id)
    if lease is None:
        raise NotFoundError(f"lease {lease_id} does not exist")
    if lease.cgroup == str(path) and lease.state == "active":
        return lease
    if lease.state != "active":
        raise ValidationError(f"lease {lease_id} is {lease.state}: only an active lease is bound")
    if lease.cgroup:
        raise ValidationError(
            f"lease {lease_id} is bound to {lease.cgroup} already: a lease has one cgroup"
        )
    live, partitions = await ctx.executor.call(
        lambda: (ctx.store.leases(live_only=True), ctx.store.partitions())
    )
    fences.check_not_nested(str(path), live)
    await ctx.executor.call(fences.check_fenceable, path)
    record = next((p for p in partitions if p.uuid == lease.partition_uuid), None)
    if record is None or not record.present:
        raise NotFoundError(f"lease {lease_id}: partition {lease.partition_uuid} is gone")
    nodes = ctx.nodes(record)
    fences.check_exclusive(record, nodes, str(path), fences.mig_cgroups(live, partitions))
    if not await ctx.executor.call(bind_lease, ctx.store, lease_id, str(path)):
        raise RetryLaterError(f"lease {lease_id} changed while being bound; retry")
    async with ctx.locks[record.uuid]:
        try:
            await fences.fence_cgroup(str(path))
        except AccelguardError as error:
            log.error("lease_bind_failed", lease=lease_id, cgroup=str(path), error=str(error))  # noqa: TRY400
            await retire(lease_id, f"bind to {path} failed: {error}")
            raise
    log.info("lease_bound", lease=lease_id, partition=record.uuid, cgroup=str(path))
    await ctx.report_lease(lease_id)
    bound = await ctx.executor.call(ctx.store.lease, lease_id)
    if bound is None:  # pragma: no cover - written above
        raise NotFoundError(f"lease {lease_id} vanished from the journal")
    return bound
