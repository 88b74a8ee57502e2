"""The lease state machine: a partition goes to one tenant and comes back clean.

States: ``free(clean)`` -> ``leased`` -> ``releasing`` (fence revoked, evicting) -> ``scrubbing``
-> ``free(clean)``; any failure -> ``quarantined(reason)``, left only by an operator's ``clear``
(which scrubs again) or a later successful scrub. The invariants (DESIGN.md):

1. a partition is granted only if clean (``Store.begin_grant`` checks it atomically);
2. clean becomes true only through a verified scrub that started after the last holder was gone
   (the scrub runs after eviction succeeded, and only its verified result sets ``clean``);
3. a revoked tenant can open none of the partition's nodes and no process of it holds one
   (fence revoke, then eviction, before the scrub);
4. every transition is journaled before it is acted on; at start-up anything half-done is
   driven to safety: revoke, evict, scrub; a partition the journal did not know is dirty;
5. a MIG instance is scrubbed before it is destroyed (``pinned`` feeds the layout planner).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid as uuidlib
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from agent import failpoints
from agent.config import Config
from agent.errors import (
    AccelguardError,
    IsolationError,
    NotFoundError,
    StoreError,
    ValidationError,
)
from agent.evict import Evictor
from agent.executor import BlockingExecutor
from agent.hw.devnodes import DeviceNode, own_nodes
from agent.hw.model import AcceleratorBackend, GpuInfo
from agent.inventory import InventoryService
from agent.isolation import cdi
from agent.isolation.cgroups import resolve_tenant_cgroup
from agent.isolation.fence import fence_for
from agent.isolation.rules import DeviceRule
from agent.scrub.base import POLICY_PATTERNS, ScrubTarget
from agent.scrub.certificate import NodeKey, issue_certificate
from agent.scrub.runner import ScrubOutcome, ScrubRunner
from agent.scrub.simmem import partition_range
from agent.store import LeaseRecord, PartitionRecord, Store

log = structlog.get_logger("accelguard.leases")

FP_GRANT_JOURNALED = failpoints.register("lease.grant.after_journal")
FP_GRANT_FENCED = failpoints.register("lease.grant.after_fence")
FP_GRANT_CDI = failpoints.register("lease.grant.after_cdi")
FP_RELEASE_JOURNALED = failpoints.register("lease.release.after_journal")
FP_RELEASE_REVOKED = failpoints.register("lease.release.after_revoke")
FP_RELEASE_EVICTED = failpoints.register("lease.release.after_evict")
FP_SCRUB_JOURNALED = failpoints.register("scrub.after_journal")
FP_SCRUB_DONE = failpoints.register("scrub.after_scrub")

_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")
_LIVE = ("granting", "active")
WHOLE_GPU_PROFILE = "gpu"


@dataclass(frozen=True)
class Grant:
    lease: LeaseRecord
    partition: PartitionRecord
    device_nodes: tuple[DeviceNode, ...]


class LeaseManager:
    def __init__(
        self,
        config: Config,
        store: Store,
        executor: BlockingExecutor,
        inventory: InventoryService,
        backend: AcceleratorBackend,
        scrubber: ScrubRunner,
        evictor: Evictor,
        node_key: NodeKey,
    ) -> None:
        self._config = config
        self._store = store
        self._executor = executor
        self._inventory = inventory
        self._backend = backend
        self._scrubber = scrubber
        self._evictor = evictor
        self._node_key = node_key
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # One fence computation at a time per cgroup: two leases of one cgroup granted at once
        # must not leave the fence of whichever computed first.
        self._cgroup_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._grant_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._sanitizing: set[str] = set()

    # -- queries ----------------------------------------------------------------------------------

    async def partitions(self) -> list[PartitionRecord]:
        return await self._executor.call(self._store.partitions)

    async def leases(self, live_only: bool = False) -> list[LeaseRecord]:
        return await self._executor.call(lambda: self._store.leases(live_only=live_only))

    async def _stored(self, partition_uuid: str) -> PartitionRecord:
        record = await self._executor.call(self._store.partition, partition_uuid)
        if record is None:
            raise StoreError(f"partition {partition_uuid} vanished from the journal")
        return record

    async def _set_state(
        self, partition_uuid: str, state: str, *, clean: bool, reason: str | None = None
    ) -> None:
        await self._executor.call(
            lambda: self._store.set_partition_state(
                partition_uuid, state, clean=clean, reason=reason
            )
        )

    async def _partition(self, partition_uuid: str) -> PartitionRecord:
        record = await self._executor.call(self._store.partition, partition_uuid)
        if record is None or not record.present:
            raise NotFoundError(f"partition {partition_uuid} does not exist on this node")
        return record

    async def pinned(self, *, dirty_too: bool, scrubbing_too: bool = True) -> dict[str, set[int]]:
        """GPU UUID -> GI ids the layout must not destroy: held, releasing, quarantined, and
        (as asked) being scrubbed or not yet clean (invariant 5)."""
        result: dict[str, set[int]] = defaultdict(set)
        for record in await self.partitions():
            if record.kind != "mig" or record.gi_id is None:
                continue
            waitable = record.state == "scrubbing" and not scrubbing_too
            if (record.state != "free" and not waitable) or (dirty_too and not record.clean):
                result[record.gpu_uuid].add(record.gi_id)
        return dict(result)

    # -- device nodes and fences ---------------------------------------------------------------

    def _nodes(self, record: PartitionRecord) -> list[DeviceNode]:
        nodes = self._inventory.nodes_for(record)
        if not nodes:
            raise NotFoundError(f"partition {record.uuid}: its GPU is not in the inventory")
        return nodes

    async def _fence_cgroup(self, cgroup: str) -> None:
        """Make the cgroup's fence allow exactly the nodes of its live leases (baseline aside)."""
        async with self._cgroup_locks[cgroup]:
            await self._apply_fence(cgroup)

    async def _apply_fence(self, cgroup: str) -> None:
        path = Path(cgroup)
        if not path.is_dir():
            log.info("fence_cgroup_gone", cgroup=cgroup)
            return
        rules: set[DeviceRule] = set()
        for lease in await self.leases(live_only=True):
            if lease.cgroup != cgroup or lease.state not in _LIVE:
                continue
            record = await self._executor.call(self._store.partition, lease.partition_uuid)
            if record is None or not record.present:
                continue
            for node in self._nodes(record):
                rules.add(DeviceRule(node.kind, node.major, node.minor, frozenset("rw")))  # type: ignore[arg-type]
        fence = fence_for(path)
        if rules:
            ordered = sorted(rules, key=lambda r: (r.kind, r.major or 0, r.minor or 0))
            await self._executor.call(fence.apply, path, ordered)
        else:
            await self._executor.call(fence.revoke, path)

    # -- grant ---------------------------------------------------------------------------------

    async def grant(
        self,
        tenant: str,
        cgroup: str,
        partition_uuid: str = "",
        profile: str = "",
        ttl_s: float = 0.0,
        scrub_policy: str = "",
    ) -> Grant:
        if not _TENANT.fullmatch(tenant):
            raise ValidationError(
                f"tenant {tenant!r}: use 1-128 letters, digits and . _ @ : - (starting with a "
                "letter or digit)"
            )
        if bool(partition_uuid) == bool(profile):
            raise ValidationError("name either a partition UUID or a profile, not both or neither")
        if ttl_s < 0 or ttl_s > self._config.leases.max_ttl_s:
            raise ValidationError(
                f"ttl {ttl_s:g}s: must be between 0 (no expiry) and "
                f"{self._config.leases.max_ttl_s:g}s"
            )
        if scrub_policy and scrub_policy not in POLICY_PATTERNS:
            raise ValidationError(
                f"scrub policy {scrub_policy!r}: use one of {', '.join(POLICY_PATTERNS)}"
            )
        path = resolve_tenant_cgroup(cgroup, self._config.tenants.cgroup_parents)
        async with self._grant_lock:
            record = await self._select(partition_uuid, profile)
            nodes = self._nodes(record)
            lease_id = f"lease-{uuidlib.uuid4().hex[:16]}"
            expires = time.time() + ttl_s if ttl_s else None
            taken = await self._executor.call(
                self._store.begin_grant,
                lease_id,
                record.uuid,
                tenant,
                str(path),
                expires,
                scrub_policy,
            )
            if not taken:
                raise ValidationError(f"partition {record.uuid} was taken concurrently; retry")
        log.info(
            "lease_granting", lease=lease_id, partition=record.uuid, tenant=tenant, cgroup=str(path)
        )
        failpoints.hit(FP_GRANT_JOURNALED)
        async with self._locks[record.uuid]:
            try:
                await self._fence_cgroup(str(path))
                failpoints.hit(FP_GRANT_FENCED)
                await self._executor.call(
                    cdi.write_spec, self._config.leases.cdi_dir, lease_id, nodes
                )
                failpoints.hit(FP_GRANT_CDI)
                await self._executor.call(self._store.set_lease_state, lease_id, "active")
            except AccelguardError as error:
                log.error("lease_grant_failed", lease=lease_id, error=str(error))  # noqa: TRY400
                await self._retire(lease_id, f"grant failed: {error}")
                raise
        lease = await self._executor.call(self._store.lease, lease_id)
        if lease is None:  # pragma: no cover - written above
            raise StoreError(f"lease {lease_id} vanished from the journal")
        log.info("lease_granted", lease=lease_id, partition=record.uuid, tenant=tenant)
        return Grant(
            lease=lease, partition=await self._stored(record.uuid), device_nodes=tuple(nodes)
        )

    async def _select(self, partition_uuid: str, profile: str) -> PartitionRecord:
        if partition_uuid:
            record = await self._partition(partition_uuid)
            self._check_grantable(record)
            return record
        candidates = []
        for record in await self.partitions():
            matches = (
                record.kind == "gpu" if profile == WHOLE_GPU_PROFILE else record.profile == profile
            )
            if matches:
                candidates.append(record)
        for record in candidates:
            if record.state == "free" and record.clean:
                return record
        if not candidates:
            raise NotFoundError(f"no partition with profile {profile!r} on this node")
        states = ", ".join(sorted({self._state_text(r) for r in candidates}))
        raise ValidationError(f"no free clean partition with profile {profile!r} ({states})")

    @staticmethod
    def _state_text(record: PartitionRecord) -> str:
        if record.state == "free":
            return "free" if record.clean else "dirty, awaiting scrub"
        return record.state

    def _check_grantable(self, record: PartitionRecord) -> None:
        if record.state == "leased":
            raise ValidationError(f"partition {record.uuid} is leased ({record.lease_id})")
        if record.state == "quarantined":
            raise ValidationError(f"partition {record.uuid} is quarantined: {record.reason}")
        if record.state in ("releasing", "scrubbing"):
            raise ValidationError(f"partition {record.uuid} is {record.state}; not grantable yet")
        if not record.clean:
            raise ValidationError(f"partition {record.uuid} is dirty (awaiting scrub)")

    # -- release ---------------------------------------------------------------------------------

    async def release(self, lease_id: str, reason: str = "released") -> PartitionRecord:
        lease = await self._executor.call(self._store.lease, lease_id)
        if lease is None:
            raise NotFoundError(f"lease {lease_id} does not exist")
        if lease.state == "released":
            raise ValidationError(f"lease {lease_id} is already released")
        if lease.state == "releasing":
            raise ValidationError(f"lease {lease_id} is already being released")
        async with self._locks[lease.partition_uuid]:
            # A concurrent release may have finished while we waited for the partition.
            current = await self._executor.call(self._store.lease, lease_id)
            if current is None or current.state == "released":
                raise ValidationError(f"lease {lease_id} is already released")
            return await self._retire(lease_id, reason)

    async def _retire(self, lease_id: str, reason: str) -> PartitionRecord:
        """Revoke, evict, scrub. Caller holds the partition lock. Idempotent after a crash."""
        lease = await self._executor.call(self._store.lease, lease_id)
        if lease is None:  # pragma: no cover - callers checked
            raise NotFoundError(f"lease {lease_id} does not exist")
        await self._executor.call(self._store.begin_release, lease_id, reason)
        log.info("lease_releasing", lease=lease_id, partition=lease.partition_uuid, reason=reason)
        failpoints.hit(FP_RELEASE_JOURNALED)
        record = await self._executor.call(self._store.partition, lease.partition_uuid)
        try:
            await self._fence_cgroup(lease.cgroup)
            failpoints.hit(FP_RELEASE_REVOKED)
            await self._executor.call(cdi.remove_spec, self._config.leases.cdi_dir, lease_id)
            if record is not None and record.present:
                await self._evict(record, lease)
            failpoints.hit(FP_RELEASE_EVICTED)
        except AccelguardError as error:
            await self._executor.call(self._store.finish_release, lease_id)
            return await self._quarantine(lease.partition_uuid, f"release failed: {error}")
        await self._executor.call(self._store.finish_release, lease_id)
        log.info("lease_released", lease=lease_id, partition=lease.partition_uuid)
        if record is None or not record.present:
            return await self._stored(lease.partition_uuid)
        return await self._scrub(lease.partition_uuid, lease_id)

    async def _evict(self, record: PartitionRecord, lease: LeaseRecord) -> None:
        nodes = self._nodes(record)
        others = [
            other
            for other in await self.leases(live_only=True)
            if other.cgroup == lease.cgroup and other.id != lease.id
        ]
        cgroup = Path(lease.cgroup)
        report = await self._evictor.evict(
            own_nodes(nodes),
            nodes,
            cgroup if cgroup.is_dir() else None,
            kill_whole_cgroup=not others,
            nvml_holders=lambda: self._nvml_holders(record),
        )
        if report.terminated or report.killed:
            log.info(
                "lease_evicted", lease=lease.id, partition=record.uuid,
                terminated=report.terminated, killed=report.killed, outsiders=report.outsiders,
            )  # fmt: skip

    async def _nvml_holders(self, record: PartitionRecord) -> set[int]:
        processes = await self._executor.call(self._backend.running_processes, record.gpu_index)
        if record.kind == "gpu":
            return {pid for pid, _, _ in processes}
        return {pid for pid, gi, ci in processes if gi == record.gi_id and ci == record.ci_id}

    # -- scrub, quarantine -----------------------------------------------------------------------

    def _gpu(self, record: PartitionRecord) -> GpuInfo:
        for gpu in self._inventory.snapshot.gpus:
            if gpu.uuid == record.gpu_uuid:
                return gpu
        raise NotFoundError(
            f"partition {record.uuid}: GPU {record.gpu_uuid} is not in the inventory"
        )

    def scrub_target(self, record: PartitionRecord) -> ScrubTarget:
        gpu = self._gpu(record)
        total = gpu.memory_total_bytes
        for instance in gpu.instances:
            if instance.uuid == record.uuid:
                total = instance.memory_bytes
        target = ScrubTarget(
            partition_uuid=record.uuid, gpu_uuid=gpu.uuid, gpu_index=gpu.index,
            kind="mig" if record.kind == "mig" else "gpu", visible_device=record.uuid,
            total_bytes=total,
        )  # fmt: skip
        if self._config.scrub.backend == "simmem":
            placement = None
            if (
                record.kind == "mig"
                and record.placement_start is not None
                and record.placement_size
            ):
                placement = (record.placement_start, record.placement_size)
            region = partition_range(
                Path(self._config.sim.memory_dir), gpu.uuid, self._config.sim.slice_bytes, placement
            )
            target = ScrubTarget(
                **{**target.to_dict(), "total_bytes": region.length,
                   "memory_file": str(region.path), "offset": region.offset}
            )  # fmt: skip
        return target

    async def _scrub(self, partition_uuid: str, lease_id: str | None) -> PartitionRecord:
        """Scrub a partition nobody holds; clean only on a verified result (invariant 2).

        Every scrub that produced a result gets a signed certificate, failed ones included (they
        say ``verified: false``): the evidence of what was and was not proven.
        """
        lease = await self._executor.call(self._store.lease, lease_id) if lease_id else None
        policy = (lease.scrub_policy if lease else "") or self._config.scrub.policy
        await self._set_state(partition_uuid, "scrubbing", clean=False)
        failpoints.hit(FP_SCRUB_JOURNALED)
        record = await self._stored(partition_uuid)
        started = time.time()
        try:
            target = self.scrub_target(record)
            outcome: ScrubOutcome = await self._scrubber.scrub(target, policy)
        except AccelguardError as error:
            await self._executor.call(
                self._store.record_scrub,
                partition_uuid, lease_id, started, time.time(), False, {}, str(error),
            )  # fmt: skip
            return await self._quarantine(partition_uuid, f"scrub failed: {error}")
        failpoints.hit(FP_SCRUB_DONE)
        certificate = issue_certificate(
            self._node_key,
            node_id=self._config.node.id,
            target=target,
            gpu_serial=self._gpu(record).serial,
            previous_lease_id=lease.id if lease else "",
            previous_tenant=lease.tenant if lease else "",
            result=outcome.result,
            started_at=datetime.fromtimestamp(outcome.started_at, UTC),
            finished_at=datetime.fromtimestamp(outcome.finished_at, UTC),
        )
        clean = outcome.failure is None
        await self._executor.call(
            self._store.record_scrub, partition_uuid, lease_id, outcome.started_at,
            outcome.finished_at, clean, outcome.result.to_dict(), outcome.failure or "",
        )  # fmt: skip
        await self._executor.call(
            self._store.add_certificate, partition_uuid, lease_id, clean, certificate
        )
        if outcome.failure is not None:
            return await self._quarantine(partition_uuid, f"scrub failed: {outcome.failure}")
        await self._set_state(partition_uuid, "free", clean=True, reason="")
        log.info(
            "partition_scrubbed", partition=partition_uuid, lease=lease_id, policy=policy,
            bytes=outcome.result.bytes_verified, coverage=outcome.result.coverage,
        )  # fmt: skip
        return await self._stored(partition_uuid)

    async def certificates(self, partition_uuid: str = "") -> list[dict[str, object]]:
        return await self._executor.call(self._store.certificates, partition_uuid or None)

    async def _quarantine(self, partition_uuid: str, reason: str) -> PartitionRecord:
        await self._set_state(partition_uuid, "quarantined", clean=False, reason=reason)
        log.error("partition_quarantined", partition=partition_uuid, reason=reason)
        return await self._stored(partition_uuid)

    async def quarantine(self, partition_uuid: str, reason: str) -> PartitionRecord:
        if not reason.strip():
            raise ValidationError("a quarantine needs a --reason")
        async with self._locks[partition_uuid]:
            record = await self._partition(partition_uuid)
            if record.state in ("leased", "releasing", "scrubbing"):
                raise ValidationError(
                    f"partition {partition_uuid} is {record.state}; release its lease first"
                )
            return await self._quarantine(partition_uuid, f"operator: {reason.strip()}")

    async def clear(self, partition_uuid: str, reason: str) -> PartitionRecord:
        """An operator ends a quarantine; the partition is scrubbed again before anyone gets it."""
        if not reason.strip():
            raise ValidationError("clearing a quarantine needs a --reason")
        async with self._locks[partition_uuid]:
            record = await self._partition(partition_uuid)
            if record.state != "quarantined":
                raise ValidationError(
                    f"partition {partition_uuid} is not quarantined ({record.state})"
                )
            log.info("quarantine_cleared", partition=partition_uuid, reason=reason)
            return await self._scrub(partition_uuid, None)

    async def sanitize(self, partition_uuid: str) -> PartitionRecord:
        """Scrub a free dirty partition (new, unknown to the journal, or before destroying it)."""
        async with self._locks[partition_uuid]:
            # A scrub that was running when we asked held the lock: the state is final now.
            record = await self._partition(partition_uuid)
            if record.state != "free" or record.clean:
                return record
            return await self._scrub(partition_uuid, record.last_lease_id)

    # -- the service -----------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def reconcile(self) -> None:
        """Start-up: finish or undo whatever a crash interrupted, toward safety."""
        for lease in await self.leases(live_only=True):
            record = await self._executor.call(self._store.partition, lease.partition_uuid)
            if lease.state in ("granting", "releasing"):
                reason = (
                    "recovered after restart" if lease.state == "granting" else lease.release_reason
                )
                async with self._locks[lease.partition_uuid]:
                    await self._retire(lease.id, reason or "recovered after restart")
            elif record is None or not record.present or not Path(lease.cgroup).is_dir():
                async with self._locks[lease.partition_uuid]:
                    await self._retire(lease.id, "partition or tenant cgroup disappeared")
            else:
                try:
                    await self._fence_cgroup(lease.cgroup)  # the fence survives; re-assert it
                    nodes = self._nodes(record)
                    await self._executor.call(
                        cdi.write_spec, self._config.leases.cdi_dir, lease.id, nodes
                    )
                except IsolationError as error:
                    async with self._locks[lease.partition_uuid]:
                        await self._retire(lease.id, f"fence could not be re-applied: {error}")
        for record in await self.partitions():
            if record.state in ("releasing", "scrubbing", "leased") and record.lease_id is None:
                # Half-done and no live lease owns it: unknown means dirty.
                await self._set_state(record.uuid, "free", clean=False)
        self._wake.set()

    async def _expire(self) -> None:
        now = time.time()
        for lease in await self.leases(live_only=True):
            if lease.state == "active" and lease.expires_at is not None and lease.expires_at <= now:
                log.info("lease_expired", lease=lease.id, tenant=lease.tenant)
                with contextlib.suppress(ValidationError):  # released concurrently
                    await self.release(lease.id, "expired")

    async def _sanitize_dirty(self) -> None:
        dirty = [
            r.uuid
            for r in await self.partitions()
            if r.state == "free" and not r.clean and r.uuid not in self._sanitizing
        ]
        if not dirty:
            return

        async def one(partition_uuid: str) -> None:
            self._sanitizing.add(partition_uuid)
            try:
                await self.sanitize(partition_uuid)
            except AccelguardError as error:
                log.error("sanitize_failed", partition=partition_uuid, error=str(error))  # noqa: TRY400
            finally:
                self._sanitizing.discard(partition_uuid)

        async with asyncio.TaskGroup() as group:
            for partition_uuid in dirty:
                group.create_task(one(partition_uuid))

    async def run(self) -> None:
        await self._inventory.ready.wait()
        await self.reconcile()
        while True:
            self._wake.clear()
            await self._expire()
            await self._sanitize_dirty()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
