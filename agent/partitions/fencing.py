"""Tenant fences as the lease state machine needs them: one fence per tenant cgroup, allowing
exactly the nodes of that cgroup's live leases, and the checks a grant must pass first.

Invariant 7 lives here: no node a partition owns is allowed in two tenants' fences, and tenant
cgroups never nest. ``fences`` is the agent's view of every fence on the node: the last kernel
survey (``reconcile``) plus every fence applied since, so a grant is checked without walking the
cgroup tree.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

import structlog

from agent.errors import AccelguardError, IsolationError, ValidationError
from agent.hw.ascend.nodes import npu_nodes
from agent.hw.devnodes import NVIDIA_MAJOR, DeviceNode, own_nodes
from agent.isolation import fence_for
from agent.isolation.cgroups import cgroup_hierarchy
from agent.isolation.protocol import DeviceFence, FenceState, fenced_rules
from agent.isolation.rules import DeviceRule
from agent.isolation.survey import SurveyedFence, related
from agent.partitions.context import PartitionContext
from agent.store import LeaseRecord, LeaseState, PartitionRecord

log = structlog.get_logger(__name__)
T = TypeVar("T")

# The lease states whose nodes a fence allows; a releasing lease's fence is already revoked.
FENCED = (LeaseState.GRANTING, LeaseState.ACTIVE)


def _nothing() -> None:
    """``fence_cgroup``'s ``then``: no work, so it never costs a trip to the worker thread."""


def _rules(nodes: list[tuple[str, int, int, str]]) -> list[DeviceRule]:
    """Read-write rules for these nodes, once each, in a stable order."""
    rules = {DeviceRule(kind, major, minor, frozenset("rw")) for kind, major, minor, _ in nodes}  # type: ignore[arg-type]
    return sorted(rules, key=lambda r: (r.kind, r.major or 0, r.minor or 0))


class TenantFences:
    def __init__(self, context: PartitionContext) -> None:
        self._ctx = context
        # One fence computation at a time per cgroup: two leases of one cgroup granted at once
        # must not leave the fence of whichever computed first.
        self._cgroup_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.fences: dict[str, SurveyedFence] = {}

    async def fence_cgroup(self, cgroup: str) -> None:
        """Make the cgroup's fence allow exactly the nodes of its live leases (baseline aside).
        An unbound lease (``bind_later``, cgroup empty) has no fence of its own yet."""
        await self.fence_then(cgroup, _nothing)

    async def fence_then(self, cgroup: str, then: Callable[[], T]) -> T:
        """``fence_cgroup``, then ``then`` in the worker thread, in the same trip there when it
        can (a grant activates its lease right behind its fence)."""
        if not cgroup:
            return await self._after(then)
        async with self._cgroup_locks[cgroup]:
            return await self._apply_fence(cgroup, then)

    async def _apply_fence(self, cgroup: str, then: Callable[[], T]) -> T:
        path = Path(cgroup)
        if not path.is_dir():
            # Removed (a Slurm job's cgroup at its end): the kernel dropped its fence with it.
            log.info("fence_cgroup_gone", cgroup=cgroup)
            self.fences.pop(cgroup, None)
            if then is not _nothing:
                # What was to follow the fence (a grant's activation) has no fence to stand
                # behind: it fails, and its caller undoes it.
                raise IsolationError(f"tenant cgroup {cgroup} vanished before it was fenced")
            return then()
        fence = fence_for(path)

        def from_journal() -> tuple[bool, T | None]:
            """Read the cgroup's leases, apply, read back, record and go on with ``then``, all
            in one trip to the worker thread (a grant's latency is mostly such trips). False: a
            lease from an older journal has no nodes of its own, and the inventory must be
            asked."""
            leases = [lease for lease in self._ctx.store.leases(live_only=True)
                      if lease.cgroup == cgroup and lease.state in FENCED]  # fmt: skip
            if not all(lease.nodes for lease in leases):
                return False, None
            self._apply_and_record(fence, path, _rules([n for x in leases for n in x.nodes]))
            return True, then()

        applied, result = await self._ctx.executor.call(from_journal)
        if applied:
            return cast(T, result)  # then()'s own result, None included when T allows it
        nodes = []
        for lease in await self._ctx.leases(live_only=True):
            if lease.cgroup == cgroup and lease.state in FENCED:
                nodes.extend(await self.lease_nodes(lease))
        await self._ctx.executor.call(self._apply_and_record, fence, path, _rules(nodes))
        return await self._after(then)

    async def _after(self, then: Callable[[], T]) -> T:
        """``then`` in the worker thread, unless it is ``_nothing``."""
        if then is _nothing:
            return then()
        return await self._ctx.executor.call(then)

    def _apply_and_record(self, fence: DeviceFence, path: Path, ordered: list[DeviceRule]) -> None:
        """In the worker thread: the fence applied and read back, and its audit record. A
        journal that cannot take the record fails the fence: nothing unrecorded happens."""
        cgroup = str(path)
        detail = {
            "cgroup": cgroup,
            "mechanism": fence.mechanism,
            "allowed": [f"{r.kind} {r.major}:{r.minor}" for r in ordered],
        }
        action = "fence.applied" if ordered else "fence.revoked"
        try:
            if ordered:
                fence.apply(path, ordered)
            else:
                fence.revoke(path)
        except AccelguardError as error:
            # Whatever the kernel now holds is what the next grant is checked against.
            try:
                state = fence.current(path)
            except AccelguardError:
                state = FenceState(fence.mechanism, None)  # unknown: counts as allowing all
            if state is None:
                self.fences.pop(cgroup, None)
            else:
                self.fences[cgroup] = SurveyedFence(cgroup, state)
            self._ctx.store.audit(action, outcome="failed", detail={**detail, "error": str(error)})
            raise
        # apply/revoke read the kernel back and raise unless it holds exactly this.
        self.fences[cgroup] = SurveyedFence(
            cgroup, FenceState(fence.mechanism, fenced_rules(ordered))
        )
        self._ctx.store.audit(action, detail=detail)

    async def lease_nodes(self, lease: LeaseRecord) -> list[tuple[str, int, int, str]]:
        """The nodes a lease is fenced to: fixed at grant; older journals ask the inventory."""
        if lease.nodes:
            return list(lease.nodes)
        record = await self._ctx.executor.call(self._ctx.store.partition, lease.partition_uuid)
        if record is None or not record.present:
            return []
        return [(n.kind, n.major, n.minor, str(n.path)) for n in self._ctx.nodes(record)]

    @staticmethod
    def check_fenceable(path: Path) -> None:
        """Refuse, before anything is journaled, a cgroup the fence could not take (blocking:
        it lists a v1 cgroup's directory; callers run it in the worker thread)."""
        if cgroup_hierarchy(path) != "v1-devices":
            return
        # The v1 devices controller refuses to widen a cgroup that has children
        # (security/device_cgroup.c: has_children); fence the leaf, or the parent before it
        # gets children.
        children = [p.name for p in path.iterdir() if p.is_dir()]
        if children:
            raise ValidationError(
                f"tenant cgroup {path} has child cgroups ({', '.join(sorted(children)[:3])}): "
                "cgroup v1 cannot grant devices to a cgroup with children; fence it before "
                "creating them"
            )

    @staticmethod
    def check_not_nested(cgroup: str, live: list[LeaseRecord]) -> None:
        """Tenant cgroups never nest (invariant 7): an ancestor's fence would intersect the
        descendant's, and revoking the ancestor would kill the descendant's processes."""
        for lease in live:
            if lease.cgroup != cgroup and related(lease.cgroup, cgroup):
                where = "inside" if Path(lease.cgroup) in Path(cgroup).parents else "around"
                raise ValidationError(
                    f"tenant cgroup {cgroup} is nested {where} {lease.cgroup}, which holds "
                    f"lease {lease.id} ({lease.tenant}): tenant cgroups must not nest"
                )

    @staticmethod
    def mig_cgroups(
        live: list[LeaseRecord], partitions: list[PartitionRecord]
    ) -> set[tuple[str, str]]:
        """(cgroup, GPU UUID) of every live MIG lease."""
        kinds = {p.uuid: p for p in partitions}
        return {
            (lease.cgroup, kinds[lease.partition_uuid].gpu_uuid)
            for lease in live
            if lease.partition_uuid in kinds and kinds[lease.partition_uuid].kind == "mig"
        }

    def check_exclusive(
        self,
        record: PartitionRecord,
        nodes: list[DeviceNode],
        cgroup: str,
        mig_cgroups: set[tuple[str, str]],
    ) -> None:
        """No node a partition owns may be allowed in two tenants' fences (invariant 7)."""
        own = own_nodes(nodes)
        gpu = self._ctx.gpu(record)
        for other, fence in list(self.fences.items()):  # one atomic copy: fences change meanwhile
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
            # A vNPU's chip node (/dev/davinciN) reaches the whole chip: a fence that still
            # allows it (a whole-NPU tenant from before the split) shares the vNPU's chip.
            if record.kind == "vnpu":
                chip = self._chip_nodes(record)
                if any(fence.allows(n.kind, n.major, n.minor) for n in chip):
                    raise IsolationError(
                        f"partition {record.uuid} is not granted: the fence on {other} allows "
                        f"{chip[0].path}, the whole NPU the vNPU is part of"
                    )

    def partitions_allowed(
        self, fence: SurveyedFence, partitions: list[PartitionRecord]
    ) -> list[PartitionRecord]:
        allowed = []
        for record in partitions:
            try:
                own = own_nodes(self._ctx.nodes(record))
                own += self._chip_nodes(record)
            except AccelguardError:
                continue
            if any(fence.allows(n.kind, n.major, n.minor) for n in own):
                allowed.append(record)
        return allowed

    def _chip_nodes(self, record: PartitionRecord) -> list[DeviceNode]:
        """A vNPU's chip node (/dev/davinciN): it reaches the whole chip, the vNPU included."""
        if record.kind != "vnpu":
            return []
        gpu = self._ctx.gpu(record)
        return own_nodes(npu_nodes(self._ctx.config.devices.dev_root, gpu.minor))
