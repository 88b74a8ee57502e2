"""The admin API's gRPC server: a local Unix socket, the only way the CLI reaches the daemon.

The socket is created 0660 (group = ``admin.group`` when set; agent/admin/unix_socket.py):
whoever can write it can move tenants' GPUs. Each call runs its handler (agent/admin/handlers.py);
an error leaves as the gRPC status code of agent/admin/status.py with accelguard's one-line
message, and the CLI turns it back into an exit code.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

import grpc
import structlog

from agent import __version__
from agent.admin.handlers import AdminHandlers
from agent.admin.status import status_code_for
from agent.admin.unix_socket import serve_on_unix_socket
from agent.config import Config
from agent.errors import AccelguardError
from agent.proto.accelguard.v1 import admin_pb2 as pb
from agent.proto.accelguard.v1 import admin_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

T = TypeVar("T")


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

    async def GetHealth(self, request: pb.HealthRequest, context: Any) -> pb.HealthResponse:
        return await self._guard("GetHealth", context, self._handlers.health(request))

    async def ClearPartition(
        self, request: pb.PartitionActionRequest, context: Any
    ) -> pb.Partition:
        return await self._guard("ClearPartition", context, self._handlers.clear(request))


class AdminServer:
    """Serves the handlers on ``admin.socket`` until cancelled, then removes the socket."""

    def __init__(self, config: Config, handlers: AdminHandlers) -> None:
        self._config = config
        self._handlers = handlers

    async def run(self) -> None:
        settings = self._config.admin
        server = grpc.aio.server()
        pb_grpc.add_AdminServicer_to_server(_Servicer(self._handlers), server)
        await serve_on_unix_socket(
            server,
            settings.socket,
            mode=settings.socket_mode,
            group=settings.group,
            what="admin socket",
            listening_event="admin_listening",
        )
