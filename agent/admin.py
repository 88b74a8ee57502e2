"""The admin API: gRPC over a local Unix socket, the only way the CLI reaches the daemon.

The socket is created 0660 (group = ``admin.group`` when set): whoever can write it can move
tenants' GPUs. Errors leave as gRPC status codes with accelguard's one-line message; the CLI turns
them back into exit codes.
"""

from __future__ import annotations

import asyncio
import grp
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import structlog

from agent import __version__
from agent.config import Config
from agent.errors import (
    AccelguardError,
    HardwareError,
    InsufficientResourcesError,
    InUseError,
    LinkError,
    NotFoundError,
    ValidationError,
)
from agent.hw.model import GpuInfo, MigInstanceInfo
from agent.inventory import InventoryService
from agent.layout import GpuLayoutResult, LayoutTarget
from agent.proto.accelguard.v1 import admin_pb2 as pb
from agent.proto.accelguard.v1 import admin_pb2_grpc as pb_grpc
from agent.store import PartitionRecord

log = structlog.get_logger("accelguard.admin")

T = TypeVar("T")

_STATUS_FOR: list[tuple[type[AccelguardError], grpc.StatusCode]] = [
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (InsufficientResourcesError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InUseError, grpc.StatusCode.FAILED_PRECONDITION),
    (HardwareError, grpc.StatusCode.UNAVAILABLE),
]


def status_code_for(error: AccelguardError) -> grpc.StatusCode:
    for kind, code in _STATUS_FOR:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def instance_message(instance: MigInstanceInfo) -> pb.MigInstance:
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


def gpu_message(gpu: GpuInfo) -> pb.Gpu:
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
    )


def layout_result_message(result: GpuLayoutResult) -> pb.GpuLayoutResult:
    return pb.GpuLayoutResult(
        gpu_index=result.gpu_index,
        gpu_uuid=result.gpu_uuid,
        kept=[instance_message(i) for i in result.kept],
        created=[instance_message(i) for i in result.created],
        destroyed=[instance_message(i) for i in result.destroyed],
        noop=result.noop,
        note=result.note,
    )


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
        targets.append(
            LayoutTarget(
                gpu_indices=None if target.all_gpus else tuple(target.gpu_indices),
                mig_enabled=target.mig_enabled,
                counts=dict(target.counts),
                device_filter=tuple(target.device_filter),
            )
        )
    return targets


class AdminHandlers:
    """What the admin API can do; the daemon supplies the services."""

    def __init__(
        self,
        config: Config,
        inventory: InventoryService,
        partitions: Callable[[], Awaitable[list[PartitionRecord]]],
        layout: Callable[[list[LayoutTarget], bool], Awaitable[list[GpuLayoutResult]]],
    ) -> None:
        self._config = config
        self._inventory = inventory
        self._partitions = partitions
        self._layout = layout

    async def status(self) -> pb.StatusResponse:
        snapshot = await self._inventory.refresh()
        partitions = []
        for record in await self._partitions():
            try:
                nodes = [str(n.path) for n in self._inventory.nodes_for(record)]
            except AccelguardError as error:
                log.warning("device_nodes_unavailable", partition=record.uuid, error=str(error))
                nodes = []
            partitions.append(
                pb.Partition(
                    uuid=record.uuid, kind=record.kind, gpu_index=record.gpu_index,
                    profile=record.profile, state=record.state, clean=record.clean,
                    reason=record.reason, device_nodes=nodes,
                )
            )  # fmt: skip
        return pb.StatusResponse(
            node_id=self._config.node.id,
            agent_version=__version__,
            driver_version=snapshot.driver_version,
            gpus=[gpu_message(g) for g in snapshot.gpus],
            partitions=partitions,
        )

    async def layout(self, request: pb.LayoutRequest, apply: bool) -> pb.LayoutResponse:
        results = await self._layout(layout_targets(request), apply)
        return pb.LayoutResponse(gpus=[layout_result_message(r) for r in results])


class _Servicer(pb_grpc.AdminServicer):  # type: ignore[misc]
    def __init__(self, handlers: AdminHandlers) -> None:
        self._handlers = handlers

    async def _guard(self, call: str, context: Any, work: Awaitable[T]) -> T:
        try:
            return await work
        except AccelguardError as error:
            log.info("admin_call_refused", call=call, error=str(error))
            await context.abort(status_code_for(error), str(error))
            raise  # unreachable: abort raises
        except Exception as error:
            log.exception("admin_call_failed", call=call)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {error}")
            raise

    async def Ping(self, request: pb.PingRequest, context: Any) -> pb.PingResponse:
        return pb.PingResponse(agent_version=__version__)

    async def GetStatus(self, request: pb.StatusRequest, context: Any) -> pb.StatusResponse:
        return await self._guard("GetStatus", context, self._handlers.status())

    async def PlanLayout(self, request: pb.LayoutRequest, context: Any) -> pb.LayoutResponse:
        return await self._guard("PlanLayout", context, self._handlers.layout(request, False))

    async def ApplyLayout(self, request: pb.LayoutRequest, context: Any) -> pb.LayoutResponse:
        return await self._guard("ApplyLayout", context, self._handlers.layout(request, True))


class AdminServer:
    def __init__(self, config: Config, handlers: AdminHandlers) -> None:
        self._config = config
        self._handlers = handlers

    async def run(self) -> None:
        path = self._config.admin.socket
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_socket():
                path.unlink()  # left by a previous run that was killed
        except OSError as error:
            raise LinkError(f"cannot prepare admin socket {path}: {error}") from error
        server = grpc.aio.server()
        pb_grpc.add_AdminServicer_to_server(_Servicer(self._handlers), server)
        # Create the socket with a restrictive umask so it is never briefly world-writable.
        old_umask = os.umask(0o177)
        try:
            server.add_insecure_port(f"unix:{path}")
            await server.start()
        finally:
            os.umask(old_umask)
        try:
            self._secure_socket(path)
            log.info("admin_listening", socket=str(path))
            await server.wait_for_termination()
        finally:
            await asyncio.shield(server.stop(grace=1.0))
            path.unlink(missing_ok=True)

    def _secure_socket(self, path: Path) -> None:
        mode = int(self._config.admin.socket_mode, 8)
        try:
            if self._config.admin.group:
                os.chown(path, -1, grp.getgrnam(self._config.admin.group).gr_gid)
            path.chmod(mode)
        except (OSError, KeyError) as error:
            raise LinkError(f"cannot set owner/mode of admin socket {path}: {error}") from error
