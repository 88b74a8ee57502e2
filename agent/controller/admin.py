"""The controller's operator API: gRPC ``ControllerAdmin`` on a local Unix socket (0660), the
same conventions as the agent's admin socket. ``accelguard ctl`` is its only client."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from typing import Any

import grpc
import structlog

from agent.admin.unix_socket import serve_on_unix_socket
from agent.controller.config import ControllerSection
from agent.controller.link import NodeLinkHandler
from agent.controller.store import ControllerStore, NodeRecord
from agent.controller.tokens import create_token
from agent.errors import AccelguardError, NotFoundError, ValidationError
from agent.proto.accelguard.v1 import controller_pb2 as pb
from agent.proto.accelguard.v1 import controller_pb2_grpc as pb_grpc
from agent.proto.accelguard.v1 import link_pb2
from agent.runtime.executor import BlockingExecutor
from agent.scrub.certificate import key_fingerprint

log = structlog.get_logger(__name__)


def _partitions(node: NodeRecord) -> list[link_pb2.InventoryPartition]:
    if not node.inventory:
        return []
    snapshot = link_pb2.InventorySnapshot()
    snapshot.ParseFromString(node.inventory)
    return list(snapshot.partitions)


class ControllerAdminHandlers:
    def __init__(
        self,
        settings: ControllerSection,
        store: ControllerStore,
        executor: BlockingExecutor,
        link: NodeLinkHandler,
    ) -> None:
        self._settings = settings
        self._store = store
        self._executor = executor
        self._link = link

    def _summary(self, node: NodeRecord, reports: int) -> pb.NodeSummary:
        states = Counter(p.state for p in _partitions(node))
        return pb.NodeSummary(
            node_id=node.node_id,
            connected=node.node_id in self._link.sessions,
            last_seen=node.last_seen,
            attestation=node.attestation,
            partitions=[pb.PartitionCount(state=s, count=c) for s, c in sorted(states.items())],
            agent_version=node.agent_version,
            reports=reports,
        )

    async def create_token(self, request: pb.CreateTokenRequest) -> pb.CreateTokenResponse:
        ttl = request.ttl_s or self._settings.token_ttl_s
        token, expires_at = await self._executor.call(
            create_token, self._store, request.node_id, ttl
        )
        log.info("token_created", node=request.node_id, expires_at=expires_at)
        return pb.CreateTokenResponse(token=token, node_id=request.node_id, expires_at=expires_at)

    async def list_nodes(self) -> pb.ListNodesResponse:
        def collect() -> list[tuple[NodeRecord, int]]:
            return [
                (n, sum(self._store.report_counts(n.node_id).values())) for n in self._store.nodes()
            ]

        rows = await self._executor.call(collect)
        return pb.ListNodesResponse(nodes=[self._summary(n, count) for n, count in rows])

    async def get_node(self, request: pb.GetNodeRequest) -> pb.NodeDetail:
        node = await self._executor.call(self._store.node, request.node_id)
        if node is None:
            raise NotFoundError(f"node {request.node_id!r} is not enrolled")
        counts = await self._executor.call(self._store.report_counts, node.node_id)
        session = self._link.sessions.get(node.node_id)
        del session
        return pb.NodeDetail(
            summary=self._summary(node, sum(counts.values())),
            spiffe_id=node.spiffe_id,
            enrolled_at=node.enrolled_at,
            ak_name_hex=node.ak_name.hex(),
            ek_public_sha256=hashlib.sha256(node.ek_public).hexdigest() if node.ek_public else "",
            scrub_key_fingerprint=key_fingerprint(node.scrub_key_pem),
            certificate_serial=node.cert_serial,
            certificate_not_after=node.cert_not_after,
            boot_id=node.boot_id,
            epoch=node.epoch,
            last_seq=0,
            partitions=[
                pb.NodePartition(
                    uuid=p.uuid,
                    kind=p.kind,
                    gpu_index=p.gpu_index,
                    profile=p.profile,
                    state=p.state,
                    clean=p.clean,
                    lease_id=p.lease_id,
                )
                for p in _partitions(node)
            ],
            reports_by_kind=counts,
        )

    async def status(self) -> pb.ControllerStatus:
        """Process counters, read on the event loop (no storage, no executor)."""
        return pb.ControllerStatus(
            asyncio_tasks=len(asyncio.all_tasks()),
            sessions=len(self._link.sessions),
            streams_opened=self._link.streams_opened,
            streams_closed=self._link.streams_closed,
        )

    async def certificates(
        self, request: pb.ListNodeCertificatesRequest
    ) -> pb.ListNodeCertificatesResponse:
        node = await self._executor.call(self._store.node, request.node_id)
        if node is None:
            raise NotFoundError(f"node {request.node_id!r} is not enrolled")
        stored = await self._executor.call(self._store.certificates, request.node_id)
        import base64  # noqa: PLC0415 - only this call needs it

        return pb.ListNodeCertificatesResponse(
            certificates=[
                pb.StoredScrubCertificate(
                    seq=c.seq,
                    partition_uuid=c.partition_uuid,
                    previous_lease_id=c.previous_lease_id,
                    scrub_verified=c.scrub_verified,
                    signature_checked=c.signature_checked,
                    finished_at=c.finished_at,
                    payload_json=c.payload.decode("utf-8"),
                    signature_b64=base64.b64encode(c.signature).decode("ascii"),
                )
                for c in stored
            ]
        )


_STATUS = [
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
]


class _Servicer(pb_grpc.ControllerAdminServicer):  # type: ignore[misc]
    def __init__(self, handlers: ControllerAdminHandlers) -> None:
        self._handlers = handlers

    async def _guard(self, context: Any, work: Any) -> Any:
        try:
            return await work
        except AccelguardError as error:
            code = next((c for kind, c in _STATUS if isinstance(error, kind)), None)
            await context.abort(code or grpc.StatusCode.INTERNAL, str(error))
            raise

    async def CreateToken(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._guard(context, self._handlers.create_token(request))

    async def ListNodes(self, request: Any, context: Any) -> Any:  # noqa: N802, ARG002
        return await self._guard(context, self._handlers.list_nodes())

    async def GetNode(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._guard(context, self._handlers.get_node(request))

    async def ListNodeCertificates(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._guard(context, self._handlers.certificates(request))

    async def GetStatus(self, request: Any, context: Any) -> Any:  # noqa: N802, ARG002
        return await self._guard(context, self._handlers.status())


class ControllerAdminServer:
    def __init__(self, settings: ControllerSection, handlers: ControllerAdminHandlers) -> None:
        self._settings = settings
        self._handlers = handlers

    async def run(self) -> None:
        server = grpc.aio.server()
        pb_grpc.add_ControllerAdminServicer_to_server(_Servicer(self._handlers), server)
        await serve_on_unix_socket(
            server, self._settings.admin_socket, mode=self._settings.admin_socket_mode,
            group=self._settings.admin_group, what="controller admin socket",
            listening_event="controller_admin_listening",
        )  # fmt: skip
