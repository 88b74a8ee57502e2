"""Layouts as the admin API, remote commands and the start-up re-apply ask for them: the lease
rules around the engine (agent/partitions/layout.py), the apply hooks (agent/partitions/hooks.py)
and the desired layout (agent/store/layouts.py).

Invariants:

* Applies are serialised (one lock): each plans against the state the previous one left.
* No MIG mode change under a GPU leased whole. A MIG instance that is leased, releasing,
  quarantined or not clean is never destroyed; a free dirty one the plan would destroy is
  scrubbed first (invariant 5: the driver does not promise to wipe a destroyed instance).
* Hooks run only around an apply whose plan changes something. ``before_apply`` runs before
  anything changes; when it fails the apply is refused, nothing changed and nothing is recorded.
  Every ``before_apply`` that succeeded is followed by ``after_apply``, whatever the outcome.
* An apply records its desired layout after its plan was accepted and ``before_apply``
  succeeded, before its first change: a crash mid-apply leaves it desired, and the start-up
  re-apply (agent/partitions/desired.py) completes it.
* A GPU is never reset: a MIG mode change stays pending and is reported (waiting_for_reset).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import structlog

import agent.store.layouts as desired_layouts
from agent.errors import AccelguardError, LayoutError, ValidationError
from agent.hw.model import DeviceInfo
from agent.partitions.hooks import HookPhase, HookRun, LayoutHooks
from agent.partitions.inventory import InventoryService
from agent.partitions.layout import (
    GpuLayoutResult,
    LayoutEngine,
    LayoutTarget,
    layout_devices,
    resolve_targets,
)
from agent.partitions.leases import LeaseManager
from agent.partitions.npu_layout import NpuLayoutEngine
from agent.runtime.executor import BlockingExecutor
from agent.store import Store
from agent.store.audit import current_actor
from agent.store.layouts import DesiredLayout, DesiredOutcome

log = structlog.get_logger(__name__)

# ACCELGUARD_LAYOUT_ORIGIN by who asked (agent/store/audit.py Actor kinds): the agent applies a
# layout on its own only at start-up.
_ORIGINS = {"admin": "admin", "controller": "controller", "agent": "start-up"}

Outcomes = dict[str, tuple[DesiredOutcome, str]]


@dataclass
class LayoutRun:
    """What a plan or an apply did: per GPU, and the hooks it ran."""

    gpus: list[GpuLayoutResult]
    hooks: list[HookRun] = field(default_factory=list)

    @property
    def failed_hooks(self) -> list[HookRun]:
        return [hook for hook in self.hooks if not hook.ok]


def outcome_of(result: GpuLayoutResult) -> tuple[DesiredOutcome, str]:
    """The desired-layout outcome of one GPU's applied plan."""
    if result.waiting_for_reset:
        return DesiredOutcome.WAITING_FOR_RESET, result.note
    if result.noop:
        return DesiredOutcome.MATCHES, ""
    return DesiredOutcome.APPLIED, ""


def _checked(result: GpuLayoutResult) -> tuple[DesiredOutcome, str]:
    """The outcome of a plan that was only checked (layout.reapply_at_start off)."""
    if result.noop:
        return outcome_of(result)
    changes = [f"create {len(result.created)}", f"destroy {len(result.destroyed)}"]
    return DesiredOutcome.DIFFERS, f"GPU {result.gpu_index}: would {', '.join(changes)}"


class LayoutService:
    def __init__(
        self,
        engine: LayoutEngine,
        leases: LeaseManager,
        inventory: InventoryService,
        executor: BlockingExecutor,
        store: Store,
        hooks: LayoutHooks | None = None,
        node_id: str = "",
        npu_engine: NpuLayoutEngine | None = None,
    ) -> None:
        self._gpu_engine = engine
        self._npu_engine = npu_engine or NpuLayoutEngine(None, store)
        self._leases = leases
        self._inventory = inventory
        self._executor = executor
        self._store = store
        self._hooks = hooks or LayoutHooks((), (), 60.0)
        self._node_id = node_id
        # Applies are serialised: two concurrent applies would plan against stale state.
        self._lock = asyncio.Lock()

    async def run(self, targets: list[LayoutTarget], apply: bool) -> LayoutRun:
        """Plan, or apply and record as the desired layout, what the admin API asks for."""
        async with self._lock:
            if apply:
                return await self._apply(targets, record=True)
            holders = await self._holders()
            pinned = await self._leases.pinned(dirty_too=False)
            engine = self._engine(targets)
            return LayoutRun(
                await self._executor.call(
                    lambda: engine.run(targets, apply=False, pinned=pinned, holders=holders)
                )
            )

    async def converge(self, targets: Mapping[str, LayoutTarget], *, apply: bool) -> Outcomes:
        """The start-up re-apply: GPU UUID -> its desired layout (a target naming that GPU
        alone). Each GPU is planned on its own, so one that a lease blocks does not hold up the
        others; the rest are applied together (one pair of hooks, only if something changes).
        With ``apply`` false they are only checked. Returns each GPU's outcome."""
        outcomes: Outcomes = {}
        async with self._lock:
            ready: dict[str, GpuLayoutResult] = {}
            for gpu_uuid, target in targets.items():
                try:
                    [result], _ = await self._plan_apply([target])
                except AccelguardError as error:
                    blocked = isinstance(error, ValidationError)
                    outcomes[gpu_uuid] = (
                        DesiredOutcome.BLOCKED if blocked else DesiredOutcome.FAILED,
                        str(error),
                    )
                    continue
                ready[gpu_uuid] = result
            if not apply:
                outcomes.update({uuid: _checked(result) for uuid, result in ready.items()})
                return outcomes
            if not ready:
                return outcomes
            # GPUs together, NPUs together (one engine each).
            for npu in (False, True):
                group = [uuid for uuid in ready if targets[uuid].npu == npu]
                if group:
                    outcomes.update(await self._converge_group(targets, group))
        return outcomes

    async def _converge_group(
        self, targets: Mapping[str, LayoutTarget], group: Sequence[str]
    ) -> Outcomes:
        try:
            run = await self._apply([targets[uuid] for uuid in group], record=False)
        except AccelguardError as error:
            return {uuid: (DesiredOutcome.FAILED, str(error)) for uuid in group}
        by_uuid = {result.gpu_uuid: result for result in run.gpus}
        hook_note = "; ".join(
            f"{hook.error} (the layout stays applied)" for hook in run.failed_hooks
        )
        outcomes: Outcomes = {}
        for uuid in group:
            outcome, detail = outcome_of(by_uuid[uuid])
            outcomes[uuid] = (outcome, "; ".join(d for d in (detail, hook_note) if d))
        return outcomes

    async def _plan_apply(
        self, targets: Sequence[LayoutTarget]
    ) -> tuple[list[GpuLayoutResult], dict[int, LayoutTarget]]:
        """The plan an apply would carry out, with every refusal an apply makes: a MIG mode
        change under a GPU leased whole, an instance that cannot be waited out in the way.
        Dirty instances the plan destroys are scrubbed later, so they are not pinned here."""
        gpus = (await self._inventory.refresh()).gpus
        chosen = resolve_targets(gpus, targets)
        await self._refuse_mode_change_under_lease(gpus, chosen)
        holders = await self._holders()
        pinned = await self._leases.pinned(dirty_too=False, scrubbing_too=False)
        engine = self._engine(targets)
        plan = await self._executor.call(
            lambda: engine.run(list(targets), apply=False, pinned=pinned, holders=holders)
        )
        return plan, chosen

    async def _apply(self, targets: Sequence[LayoutTarget], *, record: bool) -> LayoutRun:
        plan, chosen = await self._plan_apply(targets)
        changing = [result for result in plan if not result.noop]
        run = LayoutRun(gpus=plan)
        environment = self._environment(changing)
        if changing:
            before = await self._hooks.run(HookPhase.BEFORE_APPLY, environment)
            if before is not None:
                run.hooks.append(before)
                if not before.ok:
                    raise LayoutError(
                        f"{before.error}: the layout was not applied, nothing was changed"
                    )
        try:
            if record:
                await self._record(plan, chosen)
            results = await self._carry_out(targets, plan)
        except AccelguardError as error:
            self._inventory.refresh_soon()
            if changing:
                await self._hooks.run(
                    HookPhase.AFTER_APPLY, {**environment, "ACCELGUARD_LAYOUT_RESULT": "failed"}
                )
            if record:
                with contextlib.suppress(AccelguardError):
                    await self._set_outcomes(
                        {r.gpu_uuid: (DesiredOutcome.FAILED, str(error)) for r in plan}
                    )
            raise
        await self._inventory.refresh()
        self._leases.wake()
        run.gpus = results
        if changing:
            after = await self._hooks.run(
                HookPhase.AFTER_APPLY, {**environment, "ACCELGUARD_LAYOUT_RESULT": "applied"}
            )
            if after is not None:
                run.hooks.append(after)
        for result in results:
            if result.waiting_for_reset:
                log.warning("layout_waiting_for_reset", gpu=result.gpu_index, note=result.note)
        if record:
            await self._set_outcomes({r.gpu_uuid: outcome_of(r) for r in results})
        return run

    async def _carry_out(
        self, targets: Sequence[LayoutTarget], plan: list[GpuLayoutResult]
    ) -> list[GpuLayoutResult]:
        # Invariant 5: scrub the dirty instances the plan destroys (waiting for scrubs already
        # running), then apply with everything that is not clean pinned.
        doomed = {(r.gpu_uuid, i.gpu_instance_id) for r in plan for i in r.destroyed}
        # An NPU that gets its first vNPUs stops being a whole NPU partition: the same rule.
        split = {r.gpu_uuid for r in plan if r.created}
        for record in await self._leases.partitions():
            whole_npu = record.kind == "npu" and record.gpu_uuid in split and record.present
            if ((record.gpu_uuid, record.gi_id) in doomed or whole_npu) and not record.clean:
                scrubbed = await self._leases.sanitize(record.uuid)
                if whole_npu and not (scrubbed.state == "free" and scrubbed.clean):
                    raise LayoutError(
                        f"NPU {record.gpu_index} is {scrubbed.state} after its scrub "
                        f"({scrubbed.reason}): it is not split; clear it first"
                    )
        pinned = await self._leases.pinned(dirty_too=True)
        holders = await self._holders()
        engine = self._engine(targets)
        return await self._executor.call(
            lambda: engine.run(list(targets), apply=True, pinned=pinned, holders=holders)
        )

    def _engine(self, targets: Sequence[LayoutTarget]) -> LayoutEngine | NpuLayoutEngine:
        """NPU targets go to the vNPU engine (resolve_targets refuses a mix of both)."""
        return self._npu_engine if any(t.npu for t in targets) else self._gpu_engine

    def _environment(self, changing: Sequence[GpuLayoutResult]) -> dict[str, str]:
        """What a hook is told (docs/layouts.md "Hooks")."""
        actor = current_actor()
        return {
            "ACCELGUARD_NODE_ID": self._node_id,
            "ACCELGUARD_LAYOUT_GPUS": ",".join(str(r.gpu_index) for r in changing),
            "ACCELGUARD_LAYOUT_GPU_UUIDS": ",".join(r.gpu_uuid for r in changing),
            "ACCELGUARD_LAYOUT_ORIGIN": _ORIGINS.get(actor.kind, actor.kind),
            "ACCELGUARD_LAYOUT_REQUESTED_BY": actor.describe(),
        }

    async def _record(
        self, plan: Sequence[GpuLayoutResult], chosen: Mapping[int, LayoutTarget]
    ) -> None:
        layouts = [
            DesiredLayout(
                gpu_uuid=result.gpu_uuid,
                gpu_index=result.gpu_index,
                mig_enabled=chosen[result.gpu_index].mig_enabled,
                counts=dict(chosen[result.gpu_index].counts),
            )
            for result in plan
        ]
        by = current_actor().describe()
        await self._executor.call(lambda: desired_layouts.record(self._store, layouts, by))

    async def _set_outcomes(self, outcomes: Outcomes) -> None:
        await self._executor.call(lambda: desired_layouts.set_outcomes(self._store, outcomes))

    async def _holders(self) -> dict[str, dict[int, str]]:
        """GPU UUID -> GI id -> why its MIG instance cannot be destroyed now, for errors."""
        holders: dict[str, dict[int, str]] = {}
        for record in await self._leases.partitions():
            if record.kind not in ("mig", "vnpu") or record.gi_id is None or not record.present:
                continue
            if record.state == "leased" and record.lease_id:
                why = f"held by lease {record.lease_id}"
            elif record.state == "releasing" and record.lease_id:
                why = f"still releasing lease {record.lease_id}"
            elif record.state == "quarantined":
                why = f"quarantined ({record.reason})" if record.reason else "quarantined"
            elif record.state == "scrubbing":
                why = "being scrubbed"
            elif not record.clean:
                why = "not scrubbed yet"
            else:
                continue
            holders.setdefault(record.gpu_uuid, {})[record.gi_id] = (
                f"{why}, partition {record.uuid}"
            )
        return holders

    async def _refuse_mode_change_under_lease(
        self, gpus: Sequence[DeviceInfo], chosen: Mapping[int, LayoutTarget]
    ) -> None:
        """A MIG mode change takes a GPU leased whole away from its tenant at the next reset:
        refuse it while the whole-GPU partition is not free."""
        npu = any(target.npu for target in chosen.values())
        by_index = layout_devices(gpus, npu=npu)
        busy = {
            record.gpu_uuid: record
            for record in await self._leases.partitions()
            if record.kind in ("gpu", "npu") and record.present and record.state != "free"
        }
        for index, target in chosen.items():
            gpu = by_index[index]
            record = busy.get(gpu.uuid)
            if npu:
                # Being scrubbed is no reason to refuse: the apply waits for that scrub
                # (``_carry_out``), as it scrubs a dirty MIG instance before destroying it.
                if record is not None and not target.clear and record.state != "scrubbing":
                    holder = f"lease {record.lease_id}" if record.lease_id else record.state
                    raise LayoutError(
                        f"NPU {index} is {record.state} as a whole NPU ({holder}): splitting it "
                        "into vNPUs would take it from under that; release it first"
                    )
                continue
            if gpu.mig_current is None or record is None or target.mig_enabled == gpu.mig_pending:
                continue
            holder = f"lease {record.lease_id}" if record.lease_id else record.state
            raise LayoutError(
                f"GPU {index} is {record.state} as a whole GPU ({holder}): turning MIG "
                f"{'on' if target.mig_enabled else 'off'} would take it from under that; "
                "release it first"
            )
