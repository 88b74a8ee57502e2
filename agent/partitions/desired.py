"""The desired layout (agent/store/layouts.py): shown, forgotten, and re-applied at start-up.

Every successful ``layout apply`` (local or remote) records, per GPU UUID, what it asked for
(agent/partitions/layout_service.py). At start-up, once the journal is recovered and the
hardware reconciled with it (the lease manager's ``ready``: fail-closed first), the agent brings
each GPU back to its desired layout with the same planner and rules as an apply:

* what fits is kept; a GPU that already has its layout costs no mutating NVML call and runs no
  hook;
* a leased, releasing, quarantined instance is never destroyed: a GPU that cannot reach its
  layout without that is left as it is and reported ``blocked``;
* a MIG mode change is only set pending, never made current by a GPU reset: the GPU is reported
  ``waiting_for_reset``;
* a GPU that is no longer on the node is reported ``gone``; it is not an error.

Each GPU's outcome is logged (``layout_desired_start_up``) and kept with its desired layout, so
``accelguard layout desired`` shows it. With ``layout.reapply_at_start`` off the layout is only
checked (outcome ``differs`` where it does not match).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass

import structlog

import agent.store.layouts as desired_layouts
from agent.errors import AccelguardError, NotFoundError, ValidationError
from agent.hw.model import HUAWEI
from agent.partitions.inventory import InventoryService
from agent.partitions.layout import LayoutTarget
from agent.partitions.layout_service import LayoutService, Outcomes
from agent.runtime.executor import BlockingExecutor
from agent.store import Store
from agent.store.layouts import DesiredLayout, DesiredOutcome

log = structlog.get_logger(__name__)

# Outcomes an operator has to look at: logged as warnings.
_ATTENTION = frozenset({DesiredOutcome.BLOCKED, DesiredOutcome.WAITING_FOR_RESET,
                        DesiredOutcome.GONE, DesiredOutcome.DIFFERS})  # fmt: skip


@dataclass(frozen=True)
class DesiredView:
    """A GPU's desired layout and where that GPU is now."""

    layout: DesiredLayout
    present: bool
    gpu_index: int  # now; when recorded if the GPU is gone


class DesiredLayoutService:
    def __init__(
        self,
        store: Store,
        executor: BlockingExecutor,
        inventory: InventoryService,
        layouts: LayoutService,
        *,
        reapply_at_start: bool,
    ) -> None:
        self._store = store
        self._executor = executor
        self._inventory = inventory
        self._layouts = layouts
        self.reapply_at_start = reapply_at_start

    async def show(self) -> list[DesiredView]:
        rows = await self._executor.call(desired_layouts.desired_layouts, self._store)
        by_uuid = {gpu.uuid: gpu for gpu in (await self._inventory.refresh()).gpus}
        views = []
        for row in rows:
            gpu = by_uuid.get(row.gpu_uuid)
            index = gpu.index if gpu is not None else row.gpu_index
            views.append(DesiredView(row, gpu is not None, index))
        return sorted(views, key=lambda view: (not view.present, view.gpu_index))

    async def forget(
        self, *, all_gpus: bool, gpu_indices: Collection[int], gpu_uuids: Collection[str]
    ) -> list[DesiredView]:
        """Forget the desired layout of the GPUs named; what is left. Naming a GPU that has no
        desired layout is an error, and then nothing is forgotten."""
        if all_gpus == bool(gpu_indices or gpu_uuids):
            raise ValidationError("name either all GPUs or some GPUs (indices or UUIDs) to forget")
        views = await self.show()
        selected: set[str] | None = None
        if not all_gpus:
            present = {view.gpu_index: view for view in views if view.present}
            known = {view.layout.gpu_uuid for view in views}
            selected = set()
            for index in gpu_indices:
                if index not in present:
                    raise NotFoundError(f"GPU {index} has no desired layout: nothing was forgotten")
                selected.add(present[index].layout.gpu_uuid)
            for uuid in gpu_uuids:
                if uuid not in known:
                    raise NotFoundError(f"{uuid} has no desired layout: nothing was forgotten")
                selected.add(uuid)
        forgotten = await self._executor.call(lambda: desired_layouts.forget(self._store, selected))
        log.info("layout_desired_forgotten", gpus=forgotten)
        return await self.show()

    async def run(self, ready: asyncio.Event) -> None:
        """Re-apply (or check) the desired layout once, after ``ready`` (fail-closed
        reconciliation done); a failure is logged, it never stops the agent."""
        await ready.wait()
        try:
            await self.at_start()
        except AccelguardError as error:
            log.error("layout_desired_start_up_failed", error=str(error))  # noqa: TRY400 - one line

    async def at_start(self) -> Outcomes:
        rows = await self._executor.call(desired_layouts.desired_layouts, self._store)
        if not rows:
            return {}
        by_uuid = {gpu.uuid: gpu for gpu in (await self._inventory.refresh()).gpus}
        outcomes: Outcomes = {}
        targets: dict[str, LayoutTarget] = {}
        for row in rows:
            gpu = by_uuid.get(row.gpu_uuid)
            if gpu is None:
                outcomes[row.gpu_uuid] = (
                    DesiredOutcome.GONE,
                    f"{row.gpu_uuid} (GPU {row.gpu_index} when recorded) is not on this node",
                )
                continue
            targets[row.gpu_uuid] = LayoutTarget(
                gpu_indices=(gpu.index,),
                mig_enabled=row.mig_enabled,
                counts={} if row.clear else dict(row.counts),
                clear=row.clear,
                npu=gpu.vendor == HUAWEI,
            )
        outcomes.update(await self._layouts.converge(targets, apply=self.reapply_at_start))
        await self._executor.call(lambda: desired_layouts.set_outcomes(self._store, outcomes))
        for row in rows:
            outcome, detail = outcomes[row.gpu_uuid]
            gpu = by_uuid.get(row.gpu_uuid)
            report = log.warning if outcome in _ATTENTION else log.info
            if outcome == DesiredOutcome.FAILED:
                report = log.error
            report(
                "layout_desired_start_up", outcome=outcome.value, gpu_uuid=row.gpu_uuid,
                gpu=gpu.index if gpu is not None else None, desired=row.describe(),
                detail=detail, reapply=self.reapply_at_start,
            )  # fmt: skip
        return outcomes
