"""The admin API: gRPC over a local Unix socket, the only way the CLI reaches the daemon.

The socket is created 0660 (group = ``admin.group`` when set): whoever can write it can move
tenants' GPUs. Errors leave as gRPC status codes with accelguard's one-line message; the CLI turns
them back into exit codes.
"""

from __future__ import annotations

import asyncio
import grp
import json
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
    RetryLaterError,
    ValidationError,
)
from agent.hw.model import GpuInfo, MigInstanceInfo
from agent.inventory import InventoryService
from agent.layout import GpuLayoutResult, LayoutTarget
from agent.leases import LeaseManager
from agent.proto.accelguard.v1 import admin_pb2 as pb
from agent.proto.accelguard.v1 import admin_pb2_grpc as pb_grpc
from agent.store import LeaseRecord, PartitionRecord

log = structlog.get_logger("accelguard.admin")

T = TypeVar("T")

_STATUS_FOR: list[tuple[type[AccelguardError], grpc.StatusCode]] = [
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (RetryLaterError, grpc.StatusCode.ABORTED),
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


def lease_message(lease: LeaseRecord) -> pb.Lease:
    return pb.Lease(
        id=lease.id, tenant=lease.tenant, partition_uuid=lease.partition_uuid,
        cgroup=lease.cgroup, state=lease.state, created_at=lease.created_at,
        expires_at=lease.expires_at or 0.0, released_at=lease.released_at or 0.0,
        release_reason=lease.release_reason,
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
        leases: LeaseManager,
        layout: Callable[[list[LayoutTarget], bool], Awaitable[list[GpuLayoutResult]]],
        node_public_key: str,
    ) -> None:
        self._config = config
        self._inventory = inventory
        self._leases = leases
        self._layout = layout
        self._node_public_key = node_public_key

    def partition_message(self, record: PartitionRecord) -> pb.Partition:
        try:
            nodes = [str(n.path) for n in self._inventory.nodes_for(record)]
        except AccelguardError as error:
            log.warning("device_nodes_unavailable", partition=record.uuid, error=str(error))
            nodes = []
        return pb.Partition(
            uuid=record.uuid, kind=record.kind, gpu_index=record.gpu_index,
            profile=record.profile, state=record.state, clean=record.clean,
            reason=record.reason, holder=record.lease_id or "", device_nodes=nodes,
        )  # fmt: skip

    async def status(self) -> pb.StatusResponse:
        snapshot = await self._inventory.refresh()
        return pb.StatusResponse(
            node_id=self._config.node.id,
            agent_version=__version__,
            driver_version=snapshot.driver_version,
            gpus=[gpu_message(g) for g in snapshot.gpus],
            partitions=[self.partition_message(p) for p in await self._leases.partitions()],
            node_public_key=self._node_public_key,
        )

    async def layout(self, request: pb.LayoutRequest, apply: bool) -> pb.LayoutResponse:
        results = await self._layout(layout_targets(request), apply)
        return pb.LayoutResponse(gpus=[layout_result_message(r) for r in results])

    async def grant(self, request: pb.GrantLeaseRequest) -> pb.GrantLeaseResponse:
        grant = await self._leases.grant(
            tenant=request.tenant,
            cgroup=request.cgroup,
            partition_uuid=request.partition_uuid,
            profile=request.profile,
            ttl_s=request.ttl_s,
            scrub_policy=request.scrub_policy,
        )
        partition = self.partition_message(grant.partition)
        partition.device_nodes[:] = [str(n.path) for n in grant.device_nodes]
        return pb.GrantLeaseResponse(lease=lease_message(grant.lease), partition=partition)

    async def release(self, request: pb.ReleaseLeaseRequest) -> pb.Partition:
        return self.partition_message(await self._leases.release(request.lease_id))

    async def list_leases(self, request: pb.ListLeasesRequest) -> pb.ListLeasesResponse:
        leases = await self._leases.leases(live_only=not request.include_released)
        return pb.ListLeasesResponse(leases=[lease_message(lease) for lease in leases])

    async def list_partitions(self) -> pb.ListPartitionsResponse:
        await self._inventory.refresh()
        partitions = await self._leases.partitions()
        return pb.ListPartitionsResponse(partitions=[self.partition_message(p) for p in partitions])

    async def quarantine(self, request: pb.PartitionActionRequest) -> pb.Partition:
        record = await self._leases.quarantine(request.partition_uuid, request.reason)
        return self.partition_message(record)

    async def certificates(
        self, request: pb.ListCertificatesRequest
    ) -> pb.ListCertificatesResponse:
        documents = await self._leases.certificates(request.partition_uuid)
        return pb.ListCertificatesResponse(
            certificates=[json.dumps(d, sort_keys=True) for d in documents]
        )

    async def clear(self, request: pb.PartitionActionRequest) -> pb.Partition:
        return self.partition_message(
            await self._leases.clear(request.partition_uuid, request.reason)
        )


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

    async def GrantLease(
        self, request: pb.GrantLeaseRequest, context: Any
    ) -> pb.GrantLeaseResponse:
        return await self._guard("GrantLease", context, self._handlers.grant(request))

    async def ReleaseLease(self, request: pb.ReleaseLeaseRequest, context: Any) -> pb.Partition:
        return await self._guard("ReleaseLease", context, self._handlers.release(request))

    async def ListLeases(
        self, request: pb.ListLeasesRequest, context: Any
    ) -> pb.ListLeasesResponse:
        return await self._guard("ListLeases", context, self._handlers.list_leases(request))

    async def ListPartitions(
        self, request: pb.ListPartitionsRequest, context: Any
    ) -> pb.ListPartitionsResponse:
        return await self._guard("ListPartitions", context, self._handlers.list_partitions())

    async def QuarantinePartition(
        self, request: pb.PartitionActionRequest, context: Any
    ) -> pb.Partition:
        return await self._guard("QuarantinePartition", context, self._handlers.quarantine(request))

    async def ListCertificates(
        self, request: pb.ListCertificatesRequest, context: Any
    ) -> pb.ListCertificatesResponse:
        return await self._guard("ListCertificates", context, self._handlers.certificates(request))

    async def ClearPartition(
        self, request: pb.PartitionActionRequest, context: Any
    ) -> pb.Partition:
        return await self._guard("ClearPartition", context, self._handlers.clear(request))


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
