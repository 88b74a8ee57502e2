"""What the admin API does, one method per call, in the agent's own types.

The handlers see the services through the small interfaces declared here, only the methods they
call; the daemon hands in the real ones (``LeaseManager``, ``InventoryService``, its serialised
layout run, its ``Config``). Errors are accelguard's own and leave unchanged: the server turns
them into status codes (agent/admin/status.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Protocol

import structlog

from agent import __version__
from agent.admin.convert import (
    desired_response,
    gpu_message,
    health_message,
    layout_response,
    layout_targets,
    lease_message,
    partition_message,
)
from agent.config import NodeConfig
from agent.errors import AccelguardError
from agent.health.monitor import HealthReport
from agent.hw.devnodes import DeviceNode
from agent.partitions.desired import DesiredView
from agent.partitions.inventory import Snapshot
from agent.partitions.layout import LayoutTarget
from agent.partitions.layout_service import LayoutRun
from agent.proto.accelguard.v1 import admin_pb2 as pb
from agent.store import LeaseRecord, PartitionRecord

log = structlog.get_logger(__name__)


class NodeSettings(Protocol):
    """The configuration the handlers read: which node this is."""

    @property
    def node(self) -> NodeConfig: ...


class Inventory(Protocol):
    """The hardware as the inventory service last read it."""

    async def refresh(self) -> Snapshot: ...

    def nodes_for(self, partition: PartitionRecord) -> list[DeviceNode]: ...


class LeaseGrant(Protocol):
    @property
    def lease(self) -> LeaseRecord: ...

    @property
    def partition(self) -> PartitionRecord: ...

    @property
    def device_nodes(self) -> Sequence[DeviceNode]: ...

    @property
    def cdi_device(self) -> str: ...


class LeaseService(Protocol):
    """Leases and partitions: what the lease manager offers the admin API."""

    async def partitions(self) -> list[PartitionRecord]: ...

    async def leases(self, live_only: bool = False) -> list[LeaseRecord]: ...

    async def grant(
        self,
        tenant: str,
        cgroup: str,
        partition_uuid: str = "",
        profile: str = "",
        ttl_s: float = 0.0,
        scrub_policy: str = "",
        bind_later: bool = False,
    ) -> LeaseGrant: ...

    async def bind(self, lease_id: str, cgroup: str) -> LeaseRecord: ...

    async def release(self, lease_id: str) -> PartitionRecord: ...

    async def quarantine(self, partition_uuid: str, reason: str) -> PartitionRecord: ...

    async def clear(self, partition_uuid: str, reason: str) -> PartitionRecord: ...

    async def certificates(self, partition_uuid: str = "") -> list[dict[str, object]]: ...


class LatencyObserver(Protocol):
    """Where grant and release latencies go (agent/metrics ``Metrics``)."""

    def observe_grant(self, seconds: float) -> None: ...

    def observe_release(self, seconds: float) -> None: ...


class HealthSource(Protocol):
    """The health monitor (agent/health/monitor.py), when it runs."""

    async def report(self, events_per_gpu: int) -> HealthReport: ...


# Plan (False) or apply (True) layout targets; the daemon serialises the runs.
LayoutRunner = Callable[[list[LayoutTarget], bool], Awaitable[LayoutRun]]


class DesiredLayouts(Protocol):
    """The recorded desired layout (agent/partitions/desired.py)."""

    @property
    def reapply_at_start(self) -> bool: ...

    async def show(self) -> list[DesiredView]: ...

    async def forget(
        self, *, all_gpus: bool, gpu_indices: Collection[int], gpu_uuids: Collection[str]
    ) -> list[DesiredView]: ...


class LinkStatusSource(Protocol):
    """The link service's state for `accelguard status` (agent/link/service.py)."""

    async def link_status(self) -> pb.LinkStatus: ...


class AdminHandlers:
    """What the admin API can do; the daemon supplies the services."""

    def __init__(
        self,
        config: NodeSettings,
        inventory: Inventory,
        leases: LeaseService,
        layout: LayoutRunner,
        node_public_key: str,
        health: HealthSource | None = None,
        latencies: LatencyObserver | None = None,
        link: LinkStatusSource | None = None,
        desired: DesiredLayouts | None = None,
    ) -> None:
        self._desired = desired
        self._link = link
        self._health = health
        self._latencies = latencies
        self._node_id = config.node.id
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
        return partition_message(record, nodes)

    async def status(self) -> pb.StatusResponse:
        snapshot = await self._inventory.refresh()
        return pb.StatusResponse(
            node_id=self._node_id,
            agent_version=__version__,
            driver_version=snapshot.driver_version,
            gpus=[gpu_message(g) for g in snapshot.gpus],
            partitions=[self.partition_message(p) for p in await self._leases.partitions()],
            node_public_key=self._node_public_key,
            link=await self._link.link_status() if self._link is not None else None,
        )

    async def layout(self, request: pb.LayoutRequest, apply: bool) -> pb.LayoutResponse:
        return layout_response(await self._layout(layout_targets(request), apply))

    async def desired_layout(self) -> pb.DesiredLayoutResponse:
        if self._desired is None:
            return pb.DesiredLayoutResponse()
        return desired_response(await self._desired.show(), self._desired.reapply_at_start)

    async def forget_desired_layout(
        self, request: pb.DesiredLayoutRequest
    ) -> pb.DesiredLayoutResponse:
        if self._desired is None:
            return pb.DesiredLayoutResponse()
        views = await self._desired.forget(
            all_gpus=request.all_gpus,
            gpu_indices=list(request.gpu_indices),
            gpu_uuids=list(request.gpu_uuids),
        )
        return desired_response(views, self._desired.reapply_at_start)

    async def grant(self, request: pb.GrantLeaseRequest) -> pb.GrantLeaseResponse:
        started = time.perf_counter()
        grant = await self._leases.grant(
            tenant=request.tenant,
            cgroup=request.cgroup,
            partition_uuid=request.partition_uuid,
            profile=request.profile,
            ttl_s=request.ttl_s,
            scrub_policy=request.scrub_policy,
            bind_later=request.bind_later,
        )
        partition = partition_message(grant.partition, (str(n.path) for n in grant.device_nodes))
        if self._latencies is not None:
            self._latencies.observe_grant(time.perf_counter() - started)
        return pb.GrantLeaseResponse(
            lease=lease_message(grant.lease), partition=partition, cdi_device=grant.cdi_device
        )

    async def bind(self, request: pb.BindLeaseRequest) -> pb.Lease:
        return lease_message(await self._leases.bind(request.lease_id, request.cgroup))

    async def release(self, request: pb.ReleaseLeaseRequest) -> pb.Partition:
        started = time.perf_counter()
        record = await self._leases.release(request.lease_id)
        if self._latencies is not None:
            self._latencies.observe_release(time.perf_counter() - started)
        return self.partition_message(record)

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

    async def health(self, request: pb.HealthRequest) -> pb.HealthResponse:
        if self._health is None:
            return pb.HealthResponse(monitoring=False)
        report = await self._health.report(min(request.events or 10, 200))
        return health_message(report)

    async def clear(self, request: pb.PartitionActionRequest) -> pb.Partition:
        return self.partition_message(
            await self._leases.clear(request.partition_uuid, request.reason)
        )
