"""Declarative MIG layouts: plan the difference to the target, journal it, then apply it.

The planner keeps every existing instance that fits the target and destroys only what must change
(NVIDIA's mig-parted clears the GPU and starts over). Re-applying the current layout is a plan with
nothing to do, so it makes no mutating NVML call. A GPU instance left without its compute
instance by a crash is completed when the plan keeps it and destroyed when it does not, so an
interrupted apply converges on the next one with nothing leaked or duplicated.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import structlog

from agent.errors import HardwareError, LayoutError, NotFoundError
from agent.hw.mig.geometry import GpuGeometry, Instance, Placement
from agent.hw.mig.planner import LayoutPlan, plan_layout
from agent.hw.model import HUAWEI, NVIDIA, AcceleratorBackend, DeviceInfo, InstanceInfo
from agent.runtime import failpoints
from agent.runtime.failpoints import CrashPoint
from agent.store import Store

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class LayoutTarget:
    """One entry of a layout request: GPUs (None = all), MIG on/off, profile counts.

    MIG on with no instances destroys every free instance of the GPUs: a target asks for that
    only with ``clear`` (and no counts), never by leaving the counts out. A target that breaks
    this is refused here, so every way in (admin socket, remote command, start-up) keeps it.
    """

    gpu_indices: tuple[int, ...] | None
    mig_enabled: bool
    counts: Mapping[str, int]
    device_filter: tuple[str, ...] = ()
    clear: bool = False
    # A target for Ascend NPUs (``layout apply --npu N vir08=2``): ``gpu_indices`` are NPU logic
    # ids, ``counts`` vNPU templates, ``clear`` no vNPUs (the NPU whole), ``mig_enabled`` true
    # (an NPU has no mode; agent/partitions/npu_layout.py).
    npu: bool = False

    def __post_init__(self) -> None:
        if self.npu and not self.mig_enabled:
            raise LayoutError(
                f"the layout for {self.describe_gpus()} turns MIG off: NPUs have no MIG mode; "
                "give vNPU templates (e.g. vir08=2) or clear"
            )
        gpus = self.describe_gpus()
        wanted = any(count > 0 for count in self.counts.values())
        if self.clear and self.counts:
            raise LayoutError(
                f"the layout for {gpus} has clear and instances ({_counts_text(self.counts)}): "
                "clear means no MIG instances at all; give one or the other"
            )
        if self.clear and not self.mig_enabled:
            raise LayoutError(
                f"the layout for {gpus} has clear with MIG off: clear keeps MIG on and removes "
                "every instance; MIG off needs neither"
            )
        if not self.mig_enabled and wanted:
            raise LayoutError(
                f"the layout for {gpus} lists MIG instances ({_counts_text(self.counts)}) "
                "with MIG off"
            )
        if self.mig_enabled and not wanted and not self.clear:
            # An empty layout means "destroy every free instance": too much to do by omission.
            raise LayoutError(
                f"the layout for {gpus} asks for MIG on with no instances: give the instances "
                "to have (e.g. 3g.40gb=2), or clear (`--clear`) to remove every MIG instance"
            )

    def describe_gpus(self) -> str:
        kind = "NPU" if self.npu else "GPU"
        if self.gpu_indices is None:
            which = f"all {kind}s"
        else:
            which = f"{kind} " + ",".join(map(str, self.gpu_indices))
        if self.device_filter:
            which += f" (device-filter {','.join(self.device_filter)})"
        return which


def _counts_text(counts: Mapping[str, int]) -> str:
    return " ".join(f"{name}={count}" for name, count in counts.items()) or "none"


@dataclass
class GpuLayoutResult:
    gpu_index: int
    gpu_uuid: str
    kept: list[InstanceInfo] = field(default_factory=list)
    created: list[InstanceInfo] = field(default_factory=list)
    destroyed: list[InstanceInfo] = field(default_factory=list)
    noop: bool = True
    note: str = ""
    # The MIG mode once the plan is applied: in effect now, and set for the next GPU reset.
    # None for a GPU without MIG.
    mig_current: bool | None = None
    mig_pending: bool | None = None

    @property
    def waiting_for_reset(self) -> bool:
        """The layout takes effect only after a GPU reset (which accelguard never does)."""
        return self.mig_current is not None and self.mig_current != self.mig_pending


def _matches_filter(gpu: DeviceInfo, device_filter: Sequence[str]) -> bool:
    if not device_filter:
        return True
    return any(int(item, 16) == gpu.pci_device_id for item in device_filter)


def layout_devices(devices: Sequence[DeviceInfo], *, npu: bool) -> dict[int, DeviceInfo]:
    """Index -> device of the devices a layout addresses: NVIDIA GPUs, or Ascend NPUs. Indices
    are per vendor, so a mixed node's GPU 0, NPU 0 and accel 0 must never meet in one map."""
    vendor = HUAWEI if npu else NVIDIA
    return {device.index: device for device in devices if device.vendor == vendor}


def resolve_targets(
    gpus: Sequence[DeviceInfo], targets: Sequence[LayoutTarget]
) -> dict[int, LayoutTarget]:
    """Which target applies to which GPU (or NPU) index; each may be named by at most one target.
    GPU and NPU targets are applied separately (their indices overlap on a mixed node)."""
    npu = any(target.npu for target in targets)
    if npu and not all(target.npu for target in targets):
        raise LayoutError("give GPU and NPU layouts in separate applies")
    kind = "NPU" if npu else "GPU"
    by_index = layout_devices(gpus, npu=npu)
    chosen: dict[int, LayoutTarget] = {}
    for target in targets:
        for item in target.device_filter:
            try:
                int(item, 16)
            except ValueError:
                raise LayoutError(
                    f"device-filter {item!r} is not a PCI device id such as 0x233010DE"
                ) from None
        indices = target.gpu_indices if target.gpu_indices is not None else tuple(sorted(by_index))
        for index in indices:
            if index not in by_index:
                raise NotFoundError(
                    f"{kind} index {index} does not exist (this node has {kind}s "
                    f"{', '.join(map(str, sorted(by_index))) or 'none'})"
                )
            if not _matches_filter(by_index[index], target.device_filter):
                continue
            if index in chosen:
                raise LayoutError(f"GPU {index} is named by more than one layout entry")
            chosen[index] = target
    if not chosen:
        raise LayoutError("the layout selects no GPU on this node")
    return chosen


def _info_for(instance: Instance, geometry: GpuGeometry, gpu: DeviceInfo) -> InstanceInfo:
    for existing in gpu.instances:
        if existing.gpu_instance_id == instance.gi_id:
            return existing
    return InstanceInfo(
        uuid="",
        gpu_instance_id=instance.gi_id,
        compute_instance_id=None,
        profile_id=instance.profile_id,
        profile=geometry.profile(str(instance.profile_id)).name,
        placement_start=instance.start,
        placement_size=instance.size,
        memory_bytes=0,
    )


def _planned(placement: Placement, geometry: GpuGeometry) -> InstanceInfo:
    return InstanceInfo(
        uuid="",
        gpu_instance_id=0,
        compute_instance_id=None,
        profile_id=placement.profile_id,
        profile=geometry.profile(str(placement.profile_id)).name,
        placement_start=placement.start,
        placement_size=placement.size,
        memory_bytes=0,
    )


def _blockers(
    geometry: GpuGeometry,
    desired: Mapping[str, int],
    existing: Sequence[Instance],
    pinned: Collection[int],
) -> list[int]:
    """The pinned GI ids that stand in the way of a plan that failed: each one whose unpinning
    alone lets the plan through, else all of them when only unpinning all does; none when the
    layout fails without any pin (it is malformed or impossible on this GPU)."""
    pins = sorted(set(pinned))

    def feasible(kept: Collection[int]) -> bool:
        try:
            plan_layout(geometry, desired, existing, kept)
        except LayoutError:
            return False
        return True

    if not pins or not feasible(()):
        return []
    alone = [gi for gi in pins if feasible([other for other in pins if other != gi])]
    return alone or pins


def _on_gpu(
    gpu: DeviceInfo, error: LayoutError, blockers: Sequence[int], holders: Mapping[int, str]
) -> LayoutError:
    """The planner's error with the GPU it is about and what holds each blocking instance, so an
    operator knows which lease to release (the planner knows instances, not leases)."""
    message = f"GPU {gpu.index}: {error}"
    if blockers:
        held = "; ".join(f"GPU instance {gi} is {holders.get(gi, 'pinned')}" for gi in blockers)
        message += f" ({held})"
    return LayoutError(message)


class LayoutEngine:
    """Blocking; runs on the daemon's executor thread."""

    def __init__(self, backend: AcceleratorBackend, store: Store) -> None:
        self._backend = backend
        self._store = store

    def recover(self) -> list[int]:
        """Close journal entries of applies interrupted by a crash (they converge on re-apply)."""
        interrupted = self._store.unfinished_layouts()
        for entry in interrupted:
            self._store.finish_layout(entry.id, "failed", "interrupted: re-apply to converge")
            log.warning("layout_interrupted", journal_id=entry.id, gpu=entry.gpu_uuid)
        return [entry.id for entry in interrupted]

    def run(
        self,
        targets: Sequence[LayoutTarget],
        *,
        apply: bool,
        pinned: Mapping[str, Collection[int]] | None = None,
        holders: Mapping[str, Mapping[int, str]] | None = None,
    ) -> list[GpuLayoutResult]:
        """Plan (and with ``apply`` carry out) a layout. ``pinned``: GPU UUID -> GI ids to keep;
        ``holders``: GPU UUID -> GI id -> why it is pinned ("held by lease ..."), for errors."""
        gpus = self._backend.inventory()
        chosen = resolve_targets(gpus, targets)
        by_index = {gpu.index: gpu for gpu in gpus}
        # Plan every GPU before touching any, so a bad entry changes nothing anywhere.
        plans = {
            index: self._plan(
                by_index[index],
                target,
                (pinned or {}).get(by_index[index].uuid, ()),
                (holders or {}).get(by_index[index].uuid, {}),
            )
            for index, target in sorted(chosen.items())
        }
        results = []
        for index, (result, plan, geometry) in plans.items():
            if apply:
                self._apply(by_index[index], result, plan, geometry, chosen[index])
            results.append(result)
        return results

    def _plan(
        self,
        gpu: DeviceInfo,
        target: LayoutTarget,
        pinned: Collection[int],
        holders: Mapping[int, str],
    ) -> tuple[GpuLayoutResult, LayoutPlan | None, GpuGeometry | None]:
        result = GpuLayoutResult(gpu_index=gpu.index, gpu_uuid=gpu.uuid)
        want = target.mig_enabled
        if gpu.mig_current is None:
            if want:
                raise LayoutError(f"GPU {gpu.index} ({gpu.name}) does not support MIG")
            return result, None, None
        result.mig_current, result.mig_pending = gpu.mig_current, want
        if want and not gpu.mig_current:
            # Instances can only be created once MIG mode is current, i.e. after a GPU reset,
            # which we never do on our own: report it and let the operator reset.
            result.noop = bool(gpu.mig_pending)
            result.note = (
                f"MIG mode on is pending on GPU {gpu.index}: it takes effect after a GPU reset "
                "(an explicit operator step); re-apply the layout afterwards"
            )
            return result, None, None
        if not want and not gpu.mig_current:
            result.noop = not gpu.mig_pending
            return result, None, None
        geometry = self._backend.geometry(gpu.index)
        existing = self._backend.gpu_instances(gpu.index)
        desired = dict(target.counts) if want else {}
        try:
            plan = plan_layout(geometry, desired, existing, pinned)
        except LayoutError as error:
            raise _on_gpu(
                gpu, error, _blockers(geometry, desired, existing, pinned), holders
            ) from None
        orphans = {i.gpu_instance_id for i in gpu.instances if i.compute_instance_id is None}
        result.kept = [_info_for(i, geometry, gpu) for i in plan.keep]
        result.destroyed = [_info_for(i, geometry, gpu) for i in plan.destroy]
        result.created = [_planned(p, geometry) for p in plan.create]
        kept_orphans = orphans & {i.gi_id for i in plan.keep}
        result.noop = plan.is_noop and not kept_orphans and gpu.mig_pending == want
        if not want:
            result.note = (
                f"MIG mode off is pending on GPU {gpu.index}: it takes effect after a GPU reset"
            )
        return result, plan, geometry

    def _apply(
        self,
        gpu: DeviceInfo,
        result: GpuLayoutResult,
        plan: LayoutPlan | None,
        geometry: GpuGeometry | None,
        target: LayoutTarget,
    ) -> None:
        if result.noop:
            return
        if plan is None or geometry is None:
            self._backend.set_mig_mode(gpu.index, target.mig_enabled)
            return
        journal = self._store.begin_layout(
            gpu.uuid,
            {
                "keep": [asdict(i) for i in plan.keep],
                "destroy": [asdict(i) for i in plan.destroy],
                "create": [asdict(p) for p in plan.create],
            },
        )
        try:
            for instance in plan.destroy:
                failpoints.hit(CrashPoint.LAYOUT_BEFORE_DESTROY)
                self._backend.destroy_instance(gpu.index, instance.gi_id)
                log.info("mig_instance_destroyed", gpu=gpu.index, gi=instance.gi_id)
                failpoints.hit(CrashPoint.LAYOUT_AFTER_DESTROY)
            orphans = {i.gpu_instance_id for i in gpu.instances if i.compute_instance_id is None}
            for instance in plan.keep:
                if instance.gi_id in orphans:
                    failpoints.hit(CrashPoint.LAYOUT_BEFORE_COMPLETE_ORPHAN)
                    self._backend.add_compute_instance(gpu.index, instance.gi_id)
                    log.info("mig_instance_completed", gpu=gpu.index, gi=instance.gi_id)
            created = []
            for placement in plan.create:
                failpoints.hit(CrashPoint.LAYOUT_BEFORE_CREATE)
                info = self._backend.create_instance(gpu.index, placement)
                created.append(info)
                log.info(
                    "mig_instance_created", gpu=gpu.index, gi=info.gpu_instance_id,
                    profile=info.profile, start=info.placement_start, partition=info.uuid,
                )  # fmt: skip
                failpoints.hit(CrashPoint.LAYOUT_AFTER_CREATE)
            result.created = created
            if gpu.mig_pending != target.mig_enabled:
                self._backend.set_mig_mode(gpu.index, target.mig_enabled)
        except HardwareError as error:
            self._store.finish_layout(journal, "failed", str(error))
            raise
        self._store.finish_layout(journal, "done")
