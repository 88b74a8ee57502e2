"""vNPU layouts on Ascend NPUs: ``layout apply --npu N vir08=2``, with the MIG engine's rules.

The planner (agent/hw/ascend/planner.py) keeps the vNPUs the layout still wants, destroys the
rest and creates the missing; an NPU that already has the layout is not touched (zero DCMI
mutating calls), and a layout that cannot fit is refused with one line before anything changes
on any NPU. A vNPU that is leased, releasing, quarantined or not clean is never destroyed
(invariant 5): the planner keeps pinned vNPUs first, and a layout that needs one destroyed is
refused naming what holds it. Each apply is journaled like a MIG apply, and crashes at the same
failpoints converge on re-apply.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict
from typing import Protocol

import structlog

from agent.errors import HardwareError, LayoutError
from agent.hw.ascend.planner import VnpuPlan, plan_vnpus
from agent.hw.ascend.templates import NpuCapacity, VnpuTemplate
from agent.hw.model import DeviceInfo, DeviceSource, InstanceInfo
from agent.partitions.layout import (
    GpuLayoutResult,
    LayoutTarget,
    layout_devices,
    resolve_targets,
)
from agent.runtime import failpoints
from agent.runtime.failpoints import CrashPoint
from agent.store import Store

log = structlog.get_logger(__name__)


class VnpuBackend(DeviceSource, Protocol):
    """The Ascend backend as the vNPU layout needs it. Blocking calls."""

    def capacity(self, index: int) -> NpuCapacity: ...

    def templates(self, index: int) -> tuple[VnpuTemplate, ...]: ...

    def create_vnpu(self, index: int, template: str) -> InstanceInfo: ...

    def destroy_vnpu(self, index: int, vdev_id: int) -> None: ...


class NpuLayoutEngine:
    """Blocking; runs on the daemon's executor thread."""

    def __init__(self, backend: VnpuBackend | None, store: Store) -> None:
        self._backend = backend
        self._store = store

    def _require(self) -> VnpuBackend:
        if self._backend is None:
            raise LayoutError("this node has no Ascend NPUs ([dcmi] enabled = false)")
        return self._backend

    def run(
        self,
        targets: Sequence[LayoutTarget],
        *,
        apply: bool,
        pinned: Mapping[str, Collection[int]] | None = None,
        holders: Mapping[str, Mapping[int, str]] | None = None,
    ) -> list[GpuLayoutResult]:
        backend = self._require()
        by_index = layout_devices(backend.inventory(), npu=True)
        chosen = resolve_targets(list(by_index.values()), targets)
        # Plan every NPU before touching any, so a bad entry changes nothing anywhere.
        plans = {
            index: self._plan(
                backend,
                by_index[index],
                target,
                (pinned or {}).get(by_index[index].uuid, ()),
                (holders or {}).get(by_index[index].uuid, {}),
            )
            for index, target in sorted(chosen.items())
        }
        results = []
        for index, (result, plan) in plans.items():
            if apply and not result.noop:
                self._apply(backend, by_index[index], result, plan)
            results.append(result)
        return results

    def _plan(
        self,
        backend: VnpuBackend,
        npu: DeviceInfo,
        target: LayoutTarget,
        pinned: Collection[int],
        holders: Mapping[int, str],
    ) -> tuple[GpuLayoutResult, VnpuPlan]:
        existing = list(npu.instances)  # read with the inventory just now
        on_chip = {v.gpu_instance_id for v in existing}
        # A pinned vNPU that is gone is the reconciler's business (its lease is lost), not a
        # reason to refuse the layout.
        kept = {vdev for vdev in pinned if vdev in on_chip}
        desired = {name: count for name, count in target.counts.items() if count > 0}
        try:
            plan = plan_vnpus(
                backend.capacity(npu.index), backend.templates(npu.index), existing, desired,
                pinned=kept, label=f"NPU {npu.index}",
            )  # fmt: skip
        except LayoutError as error:
            held = "; ".join(f"vNPU {v} is {holders[v]}" for v in sorted(kept) if v in holders)
            raise LayoutError(f"{error} ({held})" if held else str(error)) from None
        result = GpuLayoutResult(gpu_index=npu.index, gpu_uuid=npu.uuid)
        result.kept = list(plan.keep)
        result.destroyed = list(plan.destroy)
        result.created = [
            InstanceInfo(
                uuid="", gpu_instance_id=0, compute_instance_id=None, profile_id=0,
                profile=template.name, placement_start=0, placement_size=template.aicore,
                memory_bytes=template.memory_mb << 20,
            )
            for template in plan.create
        ]  # fmt: skip
        result.noop = plan.mutations == 0
        return result, plan

    def _apply(
        self, backend: VnpuBackend, npu: DeviceInfo, result: GpuLayoutResult, plan: VnpuPlan
    ) -> None:
        journal = self._store.begin_layout(
            npu.uuid,
            {
                "keep": [asdict(v) for v in plan.keep],
                "destroy": [asdict(v) for v in plan.destroy],
                "create": [template.name for template in plan.create],
            },
        )
        try:
            # The backend hits layout.before_destroy/create right before its DCMI call.
            for vnpu in plan.destroy:
                backend.destroy_vnpu(npu.index, vnpu.gpu_instance_id)
                log.info("vnpu_destroyed", npu=npu.index, vdev=vnpu.gpu_instance_id)
                failpoints.hit(CrashPoint.LAYOUT_AFTER_DESTROY)
            created = []
            for template in plan.create:
                info = backend.create_vnpu(npu.index, template.name)
                created.append(info)
                log.info(
                    "vnpu_created", npu=npu.index, vdev=info.gpu_instance_id,
                    template=info.profile, partition=info.uuid,
                )  # fmt: skip
                failpoints.hit(CrashPoint.LAYOUT_AFTER_CREATE)
            result.created = created
        except HardwareError as error:
            self._store.finish_layout(journal, "failed", str(error))
            raise
        self._store.finish_layout(journal, "done")
