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
import math
import re
import time
import uuid as uuidlib
from collections import defaultdict
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from agent import failpoints
from agent.config import Config
from agent.errors import (
    AccelguardError,
    IsolationError,
    NotFoundError,
    RetryLaterError,
    StoreError,
    ValidationError,
)
from agent.evict import Evictor
from agent.executor import BlockingExecutor
from agent.hw.devnodes import NVIDIA_MAJOR, DeviceNode, own_nodes
from agent.hw.model import AcceleratorBackend, GpuInfo
from agent.inventory import InventoryService
from agent.isolation import cdi
from agent.isolation.cgroups import cgroup_hierarchy, resolve_tenant_cgroup
from agent.isolation.fence import FenceState, fence_for, fenced_rules
from agent.isolation.rules import DeviceRule
from agent.isolation.survey import SurveyedFence, related, survey_fences
from agent.scrub.base import POLICY_PATTERNS, ScrubTarget
from agent.scrub.certificate import NodeKey, issue_certificate
from agent.scrub.runner import ScrubOutcome, ScrubRunner
from agent.scrub.simmem import partition_range
from agent.store import (
    LeaseRecord,
    LeaseState,
    PartitionRecord,
    PartitionState,
    Store,
    SyncResult,
)

log = structlog.get_logger("accelguard.leases")

FP_GRANT_JOURNALED = failpoints.register("lease.grant.after_journal")
FP_GRANT_FENCED = failpoints.register("lease.grant.after_fence")
FP_GRANT_CDI = failpoints.register("lease.grant.after_cdi")
FP_RELEASE_JOURNALED = failpoints.register("lease.release.after_journal")
FP_RELEASE_REVOKED = failpoints.register("lease.release.after_revoke")
FP_RELEASE_EVICTED = failpoints.register("lease.release.after_evict")
FP_SCRUB_JOURNALED = failpoints.register("scrub.after_journal")
FP_SCRUB_DONE = failpoints.register("scrub.after_scrub")
FP_LOST_JOURNALED = failpoints.register("reconcile.lost.after_journal")
FP_LOST_REVOKED = failpoints.register("reconcile.lost.after_revoke")
FP_ORPHAN_QUARANTINED = failpoints.register("reconcile.orphan.after_quarantine")

_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")
_FENCED = (LeaseState.GRANTING, LeaseState.ACTIVE)
WHOLE_GPU_PROFILE = "gpu"
JOURNAL_LOST_REASON = (
    "journal lost or replaced (the node's key is older than its journal): nobody can vouch for "
    "this partition's memory or holders; clear it to scrub"
)
# A release that failed transiently (a full disk, a fence write refused) is retried by the agent
# on its own at this pace until it completes or quarantines.
RELEASE_RETRY_S = 2.0


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
        # Release tasks by lease id: a second `lease release` (or the expiry, or the retry loop)
        # joins the one running instead of starting another.
        self._releases: dict[str, asyncio.Task[PartitionRecord]] = {}
        # Releases asked for and not finished (a transient failure, even before the journal
        # said "releasing"): the service loop retries each until it completes or quarantines.
        self._wanted: dict[str, str] = {}
        self._tasks: set[asyncio.Task[object]] = set()
        # Every fence on the node as the last kernel survey saw it, updated by our own applies:
        # the grant path checks a new lease against it without walking the cgroup tree.
        self._fences: dict[str, SurveyedFence] = {}
        # Device nodes of partitions whose lease was lost: the inventory no longer knows them.
        self._lost_nodes: dict[str, list[DeviceNode]] = {}
        # Set at start-up when the journal is younger than the node's identity (lost, emptied).
        self.journal_lost = False
        self.ready = asyncio.Event()

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
        if record.uuid in self._lost_nodes:
            return self._lost_nodes[record.uuid]
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
            if lease.cgroup != cgroup or lease.state not in _FENCED:
                continue
            for kind, major, minor, _path in await self._lease_nodes(lease):
                rules.add(DeviceRule(kind, major, minor, frozenset("rw")))  # type: ignore[arg-type]
        fence = fence_for(path)
        ordered = sorted(rules, key=lambda r: (r.kind, r.major or 0, r.minor or 0))

        def apply_and_read_back() -> None:
            try:
                if ordered:
                    fence.apply(path, ordered)
                else:
                    fence.revoke(path)
            except AccelguardError:
                # Whatever the kernel now holds is what the next grant is checked against.
                try:
                    state = fence.current(path)
                except AccelguardError:
                    state = FenceState(fence.mechanism, None)  # unknown: counts as allowing all
                if state is None:
                    self._fences.pop(cgroup, None)
                else:
                    self._fences[cgroup] = SurveyedFence(cgroup, state)
                raise
            # apply/revoke read the kernel back and raise unless it holds exactly this.
            self._fences[cgroup] = SurveyedFence(
                cgroup, FenceState(fence.mechanism, fenced_rules(ordered))
            )

        await self._executor.call(apply_and_read_back)

    async def _lease_nodes(self, lease: LeaseRecord) -> list[tuple[str, int, int, str]]:
        """The nodes a lease is fenced to: fixed at grant; older journals ask the inventory."""
        if lease.nodes:
            return list(lease.nodes)
        record = await self._executor.call(self._store.partition, lease.partition_uuid)
        if record is None or not record.present:
            return []
        return [(n.kind, n.major, n.minor, str(n.path)) for n in self._nodes(record)]

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
        if not math.isfinite(ttl_s) or ttl_s < 0 or ttl_s > self._config.leases.max_ttl_s:
            raise ValidationError(
                f"ttl {ttl_s}s: must be a number of seconds between 0 (no expiry) and "
                f"{self._config.leases.max_ttl_s:.0f}"
            )
        if scrub_policy and scrub_policy not in POLICY_PATTERNS:
            raise ValidationError(
                f"scrub policy {scrub_policy!r}: use one of {', '.join(POLICY_PATTERNS)}"
            )
        path = resolve_tenant_cgroup(cgroup, self._config.tenants.cgroup_parents)
        if not self.ready.is_set():
            raise RetryLaterError("the agent is still reconciling after start-up; retry shortly")
        async with self._grant_lock:
            # One journal read for every check below.
            live, partitions = await self._executor.call(
                lambda: (self._store.leases(live_only=True), self._store.partitions())
            )
            self._check_not_nested(str(path), live)
            await self._check_fenceable(path)
            record = self._select(partition_uuid, profile, partitions)
            self._check_mode_settled(record)
            nodes = self._nodes(record)
            self._check_exclusive(record, nodes, str(path), self._mig_cgroups(live, partitions))
            lease_id = f"lease-{uuidlib.uuid4().hex[:16]}"
            expires = time.time() + ttl_s if ttl_s else None
            taken = await self._executor.call(
                lambda: self._store.begin_grant(
                    lease_id, record.uuid, tenant, str(path), expires, scrub_policy,
                    [(n.kind, n.major, n.minor, str(n.path)) for n in nodes],
                )
            )  # fmt: skip
            if not taken:
                raise RetryLaterError(f"partition {record.uuid} was taken concurrently; retry")
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
                if not await self._executor.call(self._store.activate_lease, lease_id):
                    raise StoreError(f"lease {lease_id} changed state while being granted")
            except AccelguardError as error:
                log.error("lease_grant_failed", lease=lease_id, error=str(error))  # noqa: TRY400
                await self._abandon_grant(lease_id, record, nodes, str(path), error)
                raise
        lease, granted = await self._executor.call(
            lambda: (self._store.lease(lease_id), self._store.partition(record.uuid))
        )
        if lease is None or granted is None:  # pragma: no cover - written above
            raise StoreError(f"lease {lease_id} vanished from the journal")
        log.info("lease_granted", lease=lease_id, partition=record.uuid, tenant=tenant)
        return Grant(lease=lease, partition=granted, device_nodes=tuple(nodes))

    async def _abandon_grant(
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
            state = await self._executor.call(fence_for(path).current, path)
            if state is not None and state.allowed is not None:
                fence = SurveyedFence(cgroup, state)
                reachable = any(fence.allows(n.kind, n.major, n.minor) for n in own)
        if not reachable:
            try:
                await self._executor.call(
                    self._store.undo_grant, lease_id, f"grant failed: {error}"
                )
                await self._executor.call(cdi.remove_spec, self._config.leases.cdi_dir, lease_id)
            except AccelguardError as undo_error:
                log.error("lease_grant_undo_failed", lease=lease_id, error=str(undo_error))  # noqa: TRY400
            else:
                log.info("lease_grant_undone", lease=lease_id, partition=record.uuid)
                return
        await self._retire(lease_id, f"grant failed: {error}")

    async def _check_fenceable(self, path: Path) -> None:
        """Refuse, before anything is journaled, a cgroup the fence could not take."""
        if cgroup_hierarchy(path) != "v1-devices":
            return
        # The v1 devices controller refuses to widen a cgroup that has children
        # (security/device_cgroup.c: has_children); fence the leaf, or the parent before it
        # gets children.
        children = await self._executor.call(lambda: [p.name for p in path.iterdir() if p.is_dir()])
        if children:
            raise ValidationError(
                f"tenant cgroup {path} has child cgroups ({', '.join(sorted(children)[:3])}): "
                "cgroup v1 cannot grant devices to a cgroup with children; fence it before "
                "creating them"
            )

    @staticmethod
    def _check_not_nested(cgroup: str, live: list[LeaseRecord]) -> None:
        """Tenant cgroups never nest (invariant 7): an ancestor's fence would intersect the
        descendant's, and revoking the ancestor would kill the descendant's processes."""
        for lease in live:
            if lease.cgroup != cgroup and related(lease.cgroup, cgroup):
                where = "inside" if Path(lease.cgroup) in Path(cgroup).parents else "around"
                raise ValidationError(
                    f"tenant cgroup {cgroup} is nested {where} {lease.cgroup}, which holds "
                    f"lease {lease.id} ({lease.tenant}): tenant cgroups must not nest"
                )

    def _check_mode_settled(self, record: PartitionRecord) -> None:
        gpu = self._gpu(record)
        if gpu.reset_required:
            pending = "on" if gpu.mig_pending else "off"
            raise ValidationError(
                f"GPU {gpu.index} has a pending MIG mode change (to {pending}): its partitions "
                "change at the next GPU reset, so none is granted until then"
            )

    @staticmethod
    def _mig_cgroups(
        live: list[LeaseRecord], partitions: list[PartitionRecord]
    ) -> set[tuple[str, str]]:
        """(cgroup, GPU UUID) of every live MIG lease."""
        kinds = {p.uuid: p for p in partitions}
        return {
            (lease.cgroup, kinds[lease.partition_uuid].gpu_uuid)
            for lease in live
            if lease.partition_uuid in kinds and kinds[lease.partition_uuid].kind == "mig"
        }

    def _check_exclusive(
        self,
        record: PartitionRecord,
        nodes: list[DeviceNode],
        cgroup: str,
        mig_cgroups: set[tuple[str, str]],
    ) -> None:
        """No node a partition owns may be allowed in two tenants' fences (invariant 7)."""
        own = own_nodes(nodes)
        gpu = self._gpu(record)
        for other, fence in self._fences.items():
            if related(other, cgroup):
                continue
            holding = [n for n in own if fence.allows(n.kind, n.major, n.minor)]
            if holding:
                raise IsolationError(
                    f"partition {record.uuid} is not granted: the fence on {other} still "
                    f"allows its node {holding[0].path}; that cgroup must be released, "
                    "revoked or removed first"
                )
            # Another fence that opens the parent GPU is fine only for another MIG tenant of the
            # same GPU; a whole-GPU fence left over from before a mode change is not.
            if (
                record.kind == "mig"
                and fence.allows("c", NVIDIA_MAJOR, gpu.minor)
                and (other, record.gpu_uuid) not in mig_cgroups
            ):
                raise IsolationError(
                    f"partition {record.uuid} is not granted: the fence on {other} allows "
                    f"/dev/nvidia{gpu.minor} without a MIG lease on that GPU"
                )

    def _select(
        self, partition_uuid: str, profile: str, partitions: list[PartitionRecord]
    ) -> PartitionRecord:
        if partition_uuid:
            named = [p for p in partitions if p.uuid == partition_uuid]
            if not named:
                raise NotFoundError(f"partition {partition_uuid} does not exist on this node")
            self._check_grantable(named[0])
            return named[0]
        candidates = []
        for record in partitions:
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
        if all(r.state == PartitionState.QUARANTINED for r in candidates):
            raise ValidationError(
                f"no free clean partition with profile {profile!r}: all quarantined ({states})"
            )
        raise RetryLaterError(f"no free clean partition with profile {profile!r} yet ({states})")

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
            raise RetryLaterError(f"partition {record.uuid} is {record.state}; not grantable yet")
        if not record.clean:
            raise RetryLaterError(f"partition {record.uuid} is dirty (awaiting scrub)")

    # -- release ---------------------------------------------------------------------------------

    async def release(self, lease_id: str, reason: str = "released") -> PartitionRecord:
        """Revoke, evict, scrub; returns the partition as the release left it.

        Idempotent: releasing a released (or lost) lease answers its recorded outcome, and a
        release already running is joined, not repeated. A step that fails transiently leaves
        the lease ``releasing``; the agent retries it on its own (RetryLaterError meanwhile).
        """
        lease = await self._executor.call(self._store.lease, lease_id)
        if lease is None:
            raise NotFoundError(f"lease {lease_id} does not exist")
        if not lease.live:
            return await self._recorded_outcome(lease)
        task = self._releases.get(lease_id) or self._start_release(lease_id, reason)
        try:
            return await asyncio.shield(task)
        except StoreError as error:
            raise RetryLaterError(
                f"release of {lease_id} was interrupted ({error}); the agent retries it on its "
                f"own: run `accelguard lease release {lease_id}` again to wait for the outcome"
            ) from error

    def _start_release(self, lease_id: str, reason: str) -> asyncio.Task[PartitionRecord]:
        task = asyncio.create_task(self._release_once(lease_id, reason), name=f"release {lease_id}")
        self._releases[lease_id] = task
        self._wanted[lease_id] = reason

        def done(finished: asyncio.Task[PartitionRecord]) -> None:
            if self._releases.get(lease_id) is finished:
                del self._releases[lease_id]
            if finished.cancelled():
                return
            error = finished.exception()
            if error is None:
                self._wanted.pop(lease_id, None)
                return
            log.error("lease_release_interrupted", lease=lease_id, error=str(error))
            if isinstance(error, AccelguardError) and not isinstance(error, StoreError):
                self._wanted.pop(lease_id, None)  # refused for good (e.g. not found): no retry

        task.add_done_callback(done)
        return task

    async def _release_once(self, lease_id: str, reason: str) -> PartitionRecord:
        lease = await self._executor.call(self._store.lease, lease_id)
        if lease is None:  # pragma: no cover - callers checked
            raise NotFoundError(f"lease {lease_id} does not exist")
        async with self._locks[lease.partition_uuid]:
            # Another path (a lost partition, a crash recovery) may have ended it meanwhile.
            current = await self._executor.call(self._store.lease, lease_id)
            if current is None or not current.live:
                return await self._recorded_outcome(current or lease)
            return await self._retire(lease_id, current.release_reason or reason)

    async def _recorded_outcome(self, lease: LeaseRecord) -> PartitionRecord:
        """The partition as this lease's release left it (it may have moved on since)."""
        record = await self._stored(lease.partition_uuid)
        outcome = lease.outcome
        if outcome in ("clean", "not granted"):
            return replace(record, state=PartitionState.FREE, clean=True, reason="", lease_id=None)
        if outcome:
            state, _, why = outcome.partition(": ")
            return replace(
                record, state=PartitionState.QUARANTINED, clean=False,
                reason=f"{state}: {why}" if state == "lost" else why, lease_id=None,
            )  # fmt: skip
        return record

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
        except StoreError:
            raise  # transient: the lease stays releasing and the agent retries it
        except AccelguardError as error:
            await self._executor.call(self._store.finish_release, lease_id)
            result = await self._quarantine(lease.partition_uuid, f"release failed: {error}")
            return await self._record_outcome(lease_id, result)
        await self._executor.call(self._store.finish_release, lease_id)
        log.info("lease_released", lease=lease_id, partition=lease.partition_uuid)
        if record is None or not record.present:
            result = await self._quarantine(
                lease.partition_uuid, "partition vanished while it was leased"
            )
        else:
            result = await self._scrub(lease.partition_uuid, lease_id)
        return await self._record_outcome(lease_id, result)

    async def _record_outcome(self, lease_id: str, record: PartitionRecord) -> PartitionRecord:
        if record.state == PartitionState.FREE and record.clean:
            outcome = "clean"
        else:
            outcome = f"{record.state}: {record.reason or 'no reason recorded'}"
        await self._executor.call(self._store.set_lease_outcome, lease_id, outcome)
        return record

    async def lose(self, lease: LeaseRecord, why: str) -> None:
        """The partition under a live lease vanished or changed identity (invariant 6).

        Journaled first (lease ``lost``, partition quarantined), then every fence of ours that
        allowed its nodes is recomputed without them, and its holders are evicted.
        """
        reason = f"lost while leased to {lease.tenant} ({lease.id}): {why}"
        if not await self._executor.call(self._store.lose_lease, lease.id, reason):
            return  # ended meanwhile
        log.error(
            "lease_lost", lease=lease.id, partition=lease.partition_uuid, tenant=lease.tenant,
            cgroup=lease.cgroup, reason=why,
        )  # fmt: skip
        failpoints.hit(FP_LOST_JOURNALED)
        nodes = [
            DeviceNode(Path(path), major, minor, kind)
            for kind, major, minor, path in await self._lease_nodes(lease)
        ]
        if nodes:
            self._lost_nodes[lease.partition_uuid] = nodes
        try:
            await self._fence_cgroup(lease.cgroup)
            failpoints.hit(FP_LOST_REVOKED)
            await self._executor.call(cdi.remove_spec, self._config.leases.cdi_dir, lease.id)
            record = await self._stored(lease.partition_uuid)
            if nodes:
                async with self._locks[lease.partition_uuid]:
                    await self._evict(record, lease)
        except AccelguardError as error:
            log.error("lost_lease_cleanup_failed", lease=lease.id, error=str(error))  # noqa: TRY400
        finally:
            self._lost_nodes.pop(lease.partition_uuid, None)

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
        record = await self._stored(partition_uuid)
        if not record.present:
            return await self._quarantine(partition_uuid, "partition vanished before its scrub")
        moved = await self._executor.call(
            lambda: self._store.transition(
                partition_uuid,
                (PartitionState.FREE, PartitionState.RELEASING, PartitionState.QUARANTINED),
                PartitionState.SCRUBBING, clean=False,
            )
        )  # fmt: skip
        if not moved:
            raise StoreError(f"partition {partition_uuid} changed state before its scrub")
        failpoints.hit(FP_SCRUB_JOURNALED)
        # The clean flag this scrub may set belongs to the identity it scrubbed (invariant 6).
        identity = record.identity
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
        cleaned = await self._executor.call(
            lambda: self._store.transition(
                partition_uuid, (PartitionState.SCRUBBING,), PartitionState.FREE, clean=True,
                reason="", identity=identity,
            )
        )  # fmt: skip
        if not cleaned:
            return await self._quarantine(
                partition_uuid, "partition changed or vanished while it was scrubbed"
            )
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

    # -- reconciliation: the hardware and the kernel against the journal (invariant 6) ---------

    async def on_inventory_sync(self, result: SyncResult) -> None:
        """Called by the inventory after every refresh, before anyone reads the new snapshot.

        A live lease whose partition vanished or changed identity is lost: journaled and
        quarantined here, at once (a status right after shows it); the fence revocation and
        the eviction run as their own task.
        """
        gone = set(result.vanished) | set(result.changed)
        if not gone:
            return
        for lease in await self.leases(live_only=True):
            if lease.partition_uuid in gone:
                why = (
                    "the partition vanished from the hardware"
                    if lease.partition_uuid in result.vanished
                    else "the partition changed identity (GPU UUID, MIG mode, GI/CI or placement)"
                )
                self._spawn(self.lose(lease, why), f"lose {lease.id}")
        for uuid in result.vanished:
            log.warning("partition_vanished", partition=uuid)
        for uuid in result.changed:
            log.warning("partition_changed", partition=uuid)
        self._wake.set()

    def _spawn(self, work: Coroutine[Any, Any, object], name: str) -> None:
        task: asyncio.Task[object] = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def audit_fences(self) -> None:
        """Read every fence back from the kernel and make it what the journal says.

        A cgroup with live leases whose fence drifted is re-fenced (a failure there releases
        the lease: fail closed). A fence of ours on a cgroup whose leases all ended is revoked to
        the baseline. A fence nobody in the journal explains (a lost journal, another manager)
        is reported, left in place (it only restricts), and every partition whose own nodes it
        allows is quarantined: it is not handed out while a stranger can open it.
        """
        parents = list(self._config.tenants.cgroup_parents)
        fences, problems = await asyncio.to_thread(survey_fences, parents)
        for problem in problems:
            log.error("fence_unreadable", cgroup=problem.cgroup, error=problem.error)
        live = await self.leases(live_only=True)
        history = {lease.cgroup for lease in await self.leases()}
        leased = {lease.cgroup for lease in live if lease.state in _FENCED}
        self._fences = {fence.cgroup: fence for fence in fences}
        partitions = [p for p in await self.partitions() if p.present]
        for fence in fences:
            if any(related(cgroup, fence.cgroup) for cgroup in leased):
                if fence.cgroup in leased:
                    await self._check_drift(fence, live)
                continue  # a descendant of a leased cgroup inherits (v1) its fence
            if fence.cgroup in history:
                # Ours, and none of its leases is live any more (lost, or a crash between
                # journal and revoke): nothing beyond the baseline may remain.
                if fence.state.allowed is None or tuple(fence.state.allowed) != fenced_rules(()):
                    log.warning("stale_fence_revoked", cgroup=fence.cgroup)
                    await self._fence_cgroup(fence.cgroup)
                continue
            allows = self._partitions_allowed(fence, partitions)
            for record in allows:
                if record.state == PartitionState.QUARANTINED:
                    continue
                if record.state != PartitionState.FREE:
                    continue  # leased, releasing or scrubbing: its own path ends it safely
                reason = f"the fence on {fence.cgroup} allows its nodes and no lease explains it"
                await self._quarantine(record.uuid, reason)
                failpoints.hit(FP_ORPHAN_QUARANTINED)
            if allows:
                log.error(
                    "unexplained_fence", cgroup=fence.cgroup, mechanism=fence.state.mechanism,
                    partitions=[r.uuid for r in allows],
                )  # fmt: skip

    def _partitions_allowed(
        self, fence: SurveyedFence, partitions: list[PartitionRecord]
    ) -> list[PartitionRecord]:
        allowed = []
        for record in partitions:
            try:
                own = own_nodes(self._nodes(record))
            except AccelguardError:
                continue
            if any(fence.allows(n.kind, n.major, n.minor) for n in own):
                allowed.append(record)
        return allowed

    async def _check_drift(self, fence: SurveyedFence, live: list[LeaseRecord]) -> None:
        expected = [
            DeviceRule(kind, major, minor, frozenset("rw"))  # type: ignore[arg-type]
            for lease in live
            if lease.cgroup == fence.cgroup and lease.state in _FENCED
            for kind, major, minor, _path in await self._lease_nodes(lease)
        ]
        try:
            wanted = fenced_rules(expected)
        except AccelguardError:
            return
        if fence.state.allowed is not None and tuple(fence.state.allowed) == tuple(wanted):
            return
        found = None if fence.state.allowed is None else [str(r) for r in fence.state.allowed]
        log.warning("fence_drift_corrected", cgroup=fence.cgroup, found=found)
        try:
            await self._fence_cgroup(fence.cgroup)
        except AccelguardError as error:
            for lease in live:
                if lease.cgroup == fence.cgroup:
                    self._spawn(
                        self.release(
                            lease.id, f"fence drifted and could not be re-applied: {error}"
                        ),
                        f"release {lease.id}",
                    )

    async def _forget_journal(self) -> None:
        """The journal is younger than the node: quarantine everything present."""
        for record in await self.partitions():
            if record.state != PartitionState.QUARANTINED:
                await self._quarantine(record.uuid, JOURNAL_LOST_REASON)

    # -- the service -----------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def reconcile(self) -> None:
        """Start-up: finish or undo whatever a crash interrupted, toward safety."""
        if self.journal_lost:
            log.error("journal_lost", reason=JOURNAL_LOST_REASON)
            await self._forget_journal()
        for lease in await self.leases(live_only=True):
            record = await self._executor.call(self._store.partition, lease.partition_uuid)
            if lease.state in ("granting", "releasing"):
                reason = (
                    "recovered after restart" if lease.state == "granting" else lease.release_reason
                )
                async with self._locks[lease.partition_uuid]:
                    await self._retire(lease.id, reason or "recovered after restart")
            elif record is None or not record.present:
                await self.lose(lease, "the partition vanished while the agent was down")
            elif not Path(lease.cgroup).is_dir():
                async with self._locks[lease.partition_uuid]:
                    await self._retire(lease.id, "the tenant cgroup disappeared")
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
                await self._executor.call(
                    self._store.transition, record.uuid, (record.state,), PartitionState.FREE,
                    clean=False,
                )  # fmt: skip
        await self.audit_fences()
        self.ready.set()
        self._wake.set()

    async def _expire(self, live: list[LeaseRecord]) -> float:
        """Start the release of every expired lease; seconds until the next expiry."""
        now = time.time()
        next_expiry = math.inf
        for lease in live:
            if lease.state != LeaseState.ACTIVE or lease.expires_at is None:
                continue
            if lease.expires_at > now:
                next_expiry = min(next_expiry, lease.expires_at - now)
            elif lease.id not in self._releases:
                log.info("lease_expired", lease=lease.id, tenant=lease.tenant)
                self._start_release(lease.id, "expired")
        return next_expiry

    def _retry_releases(self, live: list[LeaseRecord]) -> None:
        """A release interrupted by a transient failure is picked up again (never stuck)."""
        live_ids = {lease.id for lease in live}
        for lease_id in [i for i in self._wanted if i not in live_ids]:
            del self._wanted[lease_id]  # ended another way meanwhile
        for lease in live:
            wanted = lease.state == LeaseState.RELEASING or lease.id in self._wanted
            if wanted and lease.id not in self._releases:
                log.info("lease_release_retried", lease=lease.id)
                self._start_release(
                    lease.id, self._wanted.get(lease.id) or lease.release_reason or "released"
                )

    async def _sanitize_dirty(self) -> None:
        for record in await self.partitions():
            if record.state != "free" or record.clean or record.uuid in self._sanitizing:
                continue
            self._sanitizing.add(record.uuid)
            self._spawn(self._sanitize_one(record.uuid), f"sanitize {record.uuid}")

    async def _sanitize_one(self, partition_uuid: str) -> None:
        try:
            await self.sanitize(partition_uuid)
        except AccelguardError as error:
            log.error("sanitize_failed", partition=partition_uuid, error=str(error))  # noqa: TRY400
        finally:
            self._sanitizing.discard(partition_uuid)

    async def run(self) -> None:
        """The scheduler: it starts releases, retries and scrubs as tasks and never awaits
        them, so an expiry is acted on within a bounded delay whatever else runs (invariant 8)."""
        await self._inventory.ready.wait()
        await self.reconcile()
        last_audit = time.monotonic()
        retry_due = time.monotonic() + RELEASE_RETRY_S
        try:
            while True:
                self._wake.clear()
                timeout = 1.0
                try:
                    live = await self.leases(live_only=True)
                    timeout = min(timeout, max(0.01, await self._expire(live)))
                    if time.monotonic() >= retry_due:
                        self._retry_releases(live)
                        retry_due = time.monotonic() + RELEASE_RETRY_S
                    await self._sanitize_dirty()
                    if time.monotonic() - last_audit >= self._config.inventory.refresh_interval_s:
                        last_audit = time.monotonic()
                        await self.audit_fences()
                except AccelguardError as error:
                    # A full disk or a kernel refusal must not stop expiry for good: retry.
                    log.error("lease_service_step_failed", error=str(error))  # noqa: TRY400
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=timeout)
        finally:
            for task in [*self._tasks, *self._releases.values()]:
                task.cancel()
