"""Conversions between the admin API's protobuf messages and the agent's own types.

Pure functions: no service is called here. A request's shape is checked on the way in
(:func:`layout_targets` raises ValidationError); what comes out is built field by field.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.errors import ValidationError
from agent.health.monitor import HealthReport
from agent.hw.model import DeviceInfo, InstanceInfo
from agent.partitions.desired import DesiredView
from agent.partitions.hooks import HookRun
from agent.partitions.layout import GpuLayoutResult, LayoutTarget
from agent.partitions.layout_service import LayoutRun
from agent.proto.accelguard.v1 import admin_pb2 as pb
from agent.store import LeaseRecord, PartitionRecord


def instance_message(instance: InstanceInfo) -> pb.MigInstance:
    return pb.MigInstance(
        uuid=instance.uuid,
        gpu_instance_id=instance.gpu_instance_id,
        compute_instance_id=instance.compute_instance_id or 0,
        profile_id=instance.profile_id,
        profile=instance.profile,
        placement_start=instance.placement_start,
        placement_size=instance.placement_size,
        memory_bytes=instance.memory_bytes,
    )


def gpu_message(gpu: DeviceInfo) -> pb.Gpu:
    return pb.Gpu(
        index=gpu.index,
        uuid=gpu.uuid,
        name=gpu.name,
        serial=gpu.serial,
        pci_bus_id=gpu.pci_bus_id,
        mig_mode=pb.MigMode(current=bool(gpu.mig_current), pending=bool(gpu.mig_pending)),
        memory_total_bytes=gpu.memory_total_bytes,
        instances=[instance_message(i) for i in gpu.instances],
        reset_required=gpu.reset_required,
        vendor=gpu.vendor,
        kind=gpu.kind,
    )


def layout_result_message(result: GpuLayoutResult) -> pb.GpuLayoutResult:
    message = pb.GpuLayoutResult(
        gpu_index=result.gpu_index,
        gpu_uuid=result.gpu_uuid,
        kept=[instance_message(i) for i in result.kept],
        created=[instance_message(i) for i in result.created],
        destroyed=[instance_message(i) for i in result.destroyed],
        noop=result.noop,
        note=result.note,
        waiting_for_reset=result.waiting_for_reset,
    )
    if result.mig_current is not None:
        message.mig_mode.CopyFrom(
            pb.MigMode(current=result.mig_current, pending=bool(result.mig_pending))
        )
    return message


def hook_message(hook: HookRun) -> pb.LayoutHookRun:
    return pb.LayoutHookRun(
        phase=hook.phase.value, argv=list(hook.argv), ok=hook.ok,
        exit_code=hook.exit_code if hook.exit_code is not None else 0,
        timed_out=hook.timed_out, error=hook.error, output=hook.output,
        duration_s=hook.duration_s,
    )  # fmt: skip


def layout_response(run: LayoutRun) -> pb.LayoutResponse:
    return pb.LayoutResponse(
        gpus=[layout_result_message(r) for r in run.gpus],
        hooks=[hook_message(h) for h in run.hooks],
    )


def desired_message(view: DesiredView) -> pb.DesiredGpuLayout:
    layout = view.layout
    return pb.DesiredGpuLayout(
        gpu_uuid=layout.gpu_uuid, present=view.present, gpu_index=view.gpu_index,
        mig_enabled=layout.mig_enabled, counts=dict(layout.counts), clear=layout.clear,
        recorded_at=layout.recorded_at, recorded_by=layout.recorded_by,
        outcome=layout.outcome.value, outcome_detail=layout.outcome_detail,
        checked_at=layout.checked_at or 0.0,
    )  # fmt: skip


def desired_response(
    views: Iterable[DesiredView], reapply_at_start: bool
) -> pb.DesiredLayoutResponse:
    return pb.DesiredLayoutResponse(
        gpus=[desired_message(view) for view in views], reapply_at_start=reapply_at_start
    )


def lease_message(lease: LeaseRecord) -> pb.Lease:
    return pb.Lease(
        id=lease.id, tenant=lease.tenant, partition_uuid=lease.partition_uuid,
        cgroup=lease.cgroup, state=lease.state, created_at=lease.created_at,
        expires_at=lease.expires_at or 0.0, released_at=lease.released_at or 0.0,
        release_reason=lease.release_reason,
    )  # fmt: skip


def partition_message(record: PartitionRecord, device_nodes: Iterable[str]) -> pb.Partition:
    return pb.Partition(
        uuid=record.uuid, kind=record.kind, gpu_index=record.gpu_index,
        profile=record.profile, state=record.state, clean=record.clean,
        reason=record.reason, holder=record.lease_id or "", device_nodes=list(device_nodes),
    )  # fmt: skip


def layout_targets(request: pb.LayoutRequest) -> list[LayoutTarget]:
    if not request.targets:
        raise ValidationError("layout request has no targets")
    targets = []
    for target in request.targets:
        if target.all_gpus == bool(target.gpu_indices):
            raise ValidationError("a layout target names either all GPUs or a list of indices")
        for name, count in target.counts.items():
            if not name:
                raise ValidationError(f"layout target has an empty profile name (count {count})")
        # LayoutTarget refuses MIG on without instances unless clear (LayoutError names the
        # GPUs): the same rule for the CLI, a remote command and anything else on the socket.
        targets.append(
            LayoutTarget(
                gpu_indices=None if target.all_gpus else tuple(target.gpu_indices),
                mig_enabled=target.mig_enabled,
                counts=dict(target.counts),
                device_filter=tuple(target.device_filter),
                clear=target.clear,
                npu=target.npu,
            )
        )
    return targets


def _signed(value: int | None) -> int:
    return -1 if value is None else value


def health_message(report: HealthReport) -> pb.HealthResponse:
    gpus = []
    for gpu in report.gpus:
        state, reading = gpu.state, gpu.state.reading
        reasons = [event.detail for event in gpu.events if event.action.startswith("quarantine")]
        message = pb.GpuHealthStatus(
            index=state.index, uuid=state.uuid, state=gpu.health,
            reset_required=gpu.reset_required, reasons=reasons[:10],
            xids_by_action={str(k): v for k, v in state.xids.items()},
            events=[
                pb.HealthEventInfo(
                    id=e.id, at=e.at, kind=e.kind, code=max(e.code, 0), gi_id=_signed(e.gi_id),
                    ci_id=_signed(e.ci_id), action=e.action, reset_required=e.reset_required,
                    detail=e.detail, partitions=list(e.partitions),
                )
                for e in gpu.events
            ],
        )  # fmt: skip
        if reading is not None and reading.readable:
            message.temperature_c = _signed(reading.temperature_c)
            message.power_w = reading.power_w or 0.0
            message.ecc_volatile_sbe = _signed(reading.ecc_volatile_sbe)
            message.ecc_volatile_dbe = _signed(reading.ecc_volatile_dbe)
            message.ecc_aggregate_dbe = _signed(reading.ecc_aggregate_dbe)
            message.remapped_uncorrectable = _signed(reading.remapped_uncorrectable)
            message.remap_pending = bool(reading.remap_pending)
            message.remap_failure = bool(reading.remap_failure)
        else:
            message.temperature_c = -1
        gpus.append(message)
    return pb.HealthResponse(
        monitoring=report.started,
        last_poll=report.last_poll,
        gpus=gpus,
        holds=[
            pb.PartitionHold(
                partition_uuid=h.partition_uuid, reason=h.reason, at=h.at, event_id=h.event_id
            )
            for h in report.holds
        ],
    )
