"""The admin API's gRPC server: a local Unix socket, the only way the CLI reaches the daemon.

The socket is created 0660 (group = ``admin.read_group`` or else ``admin.group``;
agent/admin/unix_socket.py), and every call's caller is known from the kernel (``SO_PEERCRED``,
agent/admin/peers.py). Calls that change anything are taken from root and members of
``admin.group`` only; a refused call is logged with who made it, and so is every call that
changes something. Each call runs its handler (agent/admin/handlers.py); an error leaves as the
gRPC status code of agent/admin/status.py with accelguard's one-line message, and the CLI turns
it back into an exit code.
"""

from __future__ import annotations

import grp
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import grpc
import structlog

from agent import __version__
from agent.admin.handlers import AdminHandlers
from agent.admin.peers import Caller, CallerGate, authorize
from agent.admin.status import status_code_for
from agent.admin.unix_socket import serve_on_unix_socket
from agent.config import Config
from agent.errors import AccelguardError, AdminApiError, PermissionDeniedError
from agent.proto.accelguard.v1 import admin_pb2 as pb
from agent.proto.accelguard.v1 import admin_pb2_grpc as pb_grpc
from agent.runtime.executor import BlockingExecutor
from agent.store import Store
from agent.store.audit import Actor, acting_as

log = structlog.get_logger(__name__)

T = TypeVar("T")


class _Servicer(pb_grpc.AdminServicer):  # type: ignore[misc]
    def __init__(
        self,
        handlers: AdminHandlers,
        gate: CallerGate,
        admin_gid: int | None,
        audit: Callable[[str, str, dict[str, Any]], Awaitable[None]],
    ) -> None:
        self._handlers = handlers
        self._gate = gate
        self._admin_gid = admin_gid
        self._audit = audit

    def _authorize(self, call: str, caller: Caller | None, changes: bool) -> None:
        authorize(call, caller, changes=changes, admin_gid=self._admin_gid, gate=self._gate.public)
        if changes and caller is not None:
            log.info("admin_call", call=call, uid=caller.uid, gid=caller.gid, pid=caller.pid)

    async def _guard(
        self, call: str, context: Any, work: Coroutine[Any, Any, T], *, changes: bool = False
    ) -> T:
        caller = self._gate.caller(context.peer())
        actor = (
            Actor("admin", uid=caller.uid, gid=caller.gid, pid=caller.pid)
            if caller is not None
            else Actor("admin")
        )
        with acting_as(actor):
            return await self._audited(call, context, work, caller, changes)

    async def _audited(
        self,
        call: str,
        context: Any,
        work: Coroutine[Any, Any, T],
        caller: Caller | None,
        changes: bool,
    ) -> T:
        """Run the call as its caller; a changing call, and every refusal, leaves one audit
        record (``admin.<Call>``) with its outcome. Reads that succeed leave none."""
        try:
            self._authorize(call, caller, changes)
        except PermissionDeniedError as error:
            work.close()  # never started
            log.warning("admin_call_refused", call=call, peer=context.peer(), error=str(error))
            await self._audit(f"admin.{call}", "denied", {"error": str(error)})
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(error))
            raise  # unreachable: abort raises
        try:
            result = await work
        except AccelguardError as error:
            log.info("admin_call_refused", call=call, error=str(error))
            if changes:
                await self._audit(f"admin.{call}", "refused", {"error": str(error)})
            await context.abort(status_code_for(error), str(error))
            raise  # unreachable: abort raises
        except Exception as error:
            log.exception("admin_call_failed", call=call)
            if changes:
                await self._audit(f"admin.{call}", "failed", {"error": f"internal error: {error}"})
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {error}")
            raise
        if changes:
            await self._audit(f"admin.{call}", "ok", {})
        return result

    async def Ping(self, request: pb.PingRequest, context: Any) -> pb.PingResponse:
        return await self._guard("Ping", context, _version())

    async def GetStatus(self, request: pb.StatusRequest, context: Any) -> pb.StatusResponse:
        return await self._guard("GetStatus", context, self._handlers.status())

    async def PlanLayout(self, request: pb.LayoutRequest, context: Any) -> pb.LayoutResponse:
        return await self._guard("PlanLayout", context, self._handlers.layout(request, False))

    async def ApplyLayout(self, request: pb.LayoutRequest, context: Any) -> pb.LayoutResponse:
        return await self._guard(
            "ApplyLayout", context, self._handlers.layout(request, True), changes=True
        )

    async def GetDesiredLayout(
        self, request: pb.DesiredLayoutRequest, context: Any
    ) -> pb.DesiredLayoutResponse:
        return await self._guard("GetDesiredLayout", context, self._handlers.desired_layout())

    async def ForgetDesiredLayout(
        self, request: pb.DesiredLayoutRequest, context: Any
    ) -> pb.DesiredLayoutResponse:
        return await self._guard(
            "ForgetDesiredLayout", context, self._handlers.forget_desired_layout(request),
            changes=True,
        )  # fmt: skip

    async def GrantLease(
        self, request: pb.GrantLeaseRequest, context: Any
    ) -> pb.GrantLeaseResponse:
        return await self._guard("GrantLease", context, self._handlers.grant(request), changes=True)

    async def BindLease(self, request: pb.BindLeaseRequest, context: Any) -> pb.Lease:
        return await self._guard("BindLease", context, self._handlers.bind(request), changes=True)

    async def ReleaseLease(self, request: pb.ReleaseLeaseRequest, context: Any) -> pb.Partition:
        return await self._guard(
            "ReleaseLease", context, self._handlers.release(request), changes=True
        )

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
        return await self._guard(
            "QuarantinePartition", context, self._handlers.quarantine(request), changes=True
        )

    async def ListCertificates(
        self, request: pb.ListCertificatesRequest, context: Any
    ) -> pb.ListCertificatesResponse:
        return await self._guard("ListCertificates", context, self._handlers.certificates(request))

    async def GetHealth(self, request: pb.HealthRequest, context: Any) -> pb.HealthResponse:
        return await self._guard("GetHealth", context, self._handlers.health(request))

    async def ClearPartition(
        self, request: pb.PartitionActionRequest, context: Any
    ) -> pb.Partition:
        return await self._guard(
            "ClearPartition", context, self._handlers.clear(request), changes=True
        )


async def _version() -> pb.PingResponse:
    return pb.PingResponse(agent_version=__version__)


class AdminServer:
    """Serves the handlers on ``admin.socket`` until cancelled, then removes the socket."""

    def __init__(
        self, config: Config, handlers: AdminHandlers, store: Store, executor: BlockingExecutor
    ) -> None:
        self._config = config
        self._handlers = handlers
        self._store = store
        self._executor = executor

    async def _audit(self, action: str, outcome: str, detail: dict[str, Any]) -> None:
        try:
            await self._executor.call(
                lambda: self._store.audit(action, outcome=outcome, detail=detail)
            )
        except AccelguardError as error:
            log.error("admin_call_not_audited", action=action, error=str(error))  # noqa: TRY400

    async def run(self) -> None:
        settings = self._config.admin
        try:
            admin_gid = grp.getgrnam(settings.group).gr_gid if settings.group else None
        except KeyError:
            raise AdminApiError(f"admin.group: no group named {settings.group!r}") from None
        gate = CallerGate(settings.socket)
        server = grpc.aio.server()
        pb_grpc.add_AdminServicer_to_server(
            _Servicer(self._handlers, gate, admin_gid, self._audit), server
        )
        await serve_on_unix_socket(
            server,
            settings.socket,
            mode=settings.socket_mode,
            group=settings.read_group or settings.group,
            what="admin socket",
            listening_event="admin_listening",
            gate=gate,
        )
