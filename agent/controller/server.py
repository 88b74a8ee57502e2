"""``accelguard controller serve``: the controller process.

One gRPC server with two TLS ports: enrollment (server-authenticated; a node has no certificate
yet) and the node link (mutual TLS against the controller CA). Both ports serve both services;
the link refuses any stream without a node certificate. The operator API is on a Unix socket.
Every service is an ``async def run()`` under one TaskGroup; SIGTERM/SIGINT stop it cleanly.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog

from agent.controller.admin import ControllerAdminHandlers, ControllerAdminServer
from agent.controller.attestation import AttestationLoop
from agent.controller.commands import CommandDispatcher
from agent.controller.committer import ReportCommitter
from agent.controller.config import ControllerConfig
from agent.controller.enrollment import EnrollmentAuthority
from agent.controller.link import NodeLinkHandler
from agent.controller.mqtt_bridge import MqttBridge
from agent.controller.pki import ControllerPki
from agent.controller.store import SqliteControllerStore
from agent.errors import AccelguardError, EnrollmentRefusedError, LinkError, LinkProtocolError
from agent.identity.files import write_private
from agent.link.channel import server_options
from agent.link.envelope import CommandKey, command_key_id
from agent.link.wire import decode_enroll_request
from agent.proto.accelguard.v1 import link_pb2 as pb
from agent.runtime.executor import BlockingExecutor

log = structlog.get_logger(__name__)


class ControllerServer:
    def __init__(self, config: ControllerConfig) -> None:
        settings = config.controller
        self.settings = settings
        self.pki = ControllerPki(settings.pki_dir, settings.trust_domain)
        self.store = SqliteControllerStore(settings.database)
        self.executor = BlockingExecutor()
        self.committer = ReportCommitter(self.store, self.executor, settings.commit_batch)
        self.authority = EnrollmentAuthority(self.store, self.pki, settings)
        self.dispatcher = CommandDispatcher(self.store, self.executor, self._signing_key)
        self.attestation = AttestationLoop(self.store, self.executor, self.dispatcher, settings)
        self.link = NodeLinkHandler(
            self.store, self.executor, self.committer, self.pki, self.authority, settings,
            self.dispatcher,
        )  # fmt: skip
        self.link.connect_hooks.append(self.attestation.node_connected)
        self.bridge: MqttBridge | None = None
        if settings.mqtt_broker:
            self.bridge = MqttBridge(
                self.link, self.pki, settings.mqtt_broker,
                session_expiry_s=settings.mqtt_session_expiry_s,
                keepalive_s=settings.mqtt_keepalive_s,
            )  # fmt: skip
        handlers = ControllerAdminHandlers(
            settings, self.store, self.executor, self.link, self.dispatcher, self.attestation,
            self.pki,
        )  # fmt: skip
        self.admin = ControllerAdminServer(settings, handlers)
        if self.bridge is not None:
            handlers.broker_states = self.bridge.states
        self.enroll_port = 0
        self.link_port = 0

    def _signing_key(self, pinned: str) -> CommandKey:
        """The command key a node that pinned ``pinned`` accepts: the previous one for a node
        that has not confirmed a rotation yet, the current one otherwise."""
        previous = self.pki.previous_command_key
        if previous is not None and command_key_id(previous.public_key()) == pinned:
            return CommandKey(previous)
        return CommandKey(self.pki.command_key)

    async def _enroll(self, request: bytes, context: Any) -> pb.EnrollResponse:
        try:
            message = decode_enroll_request(request)
            response = await self.executor.call(self.authority.handle, message)
        except EnrollmentRefusedError as error:
            log.warning("enrollment_refused", reason=str(error), peer=context.peer())
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(error))
            raise
        except LinkProtocolError as error:
            log.warning("enrollment_malformed", reason=str(error), peer=context.peer())
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise
        except AccelguardError as error:
            log.error("enrollment_failed", error=str(error))  # noqa: TRY400
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
            raise
        if response.WhichOneof("step") == "certificate":
            log.info(
                "node_enrolled", node=response.certificate.node_id,
                attested=response.certificate.attested,
            )  # fmt: skip
        return response

    async def _connect(self, requests: AsyncIterator[bytes], context: Any) -> None:
        await self.link.connect(requests, context)

    def _handlers(self) -> list[Any]:
        # Requests arrive as bytes (no deserializer): agent/link/wire.py decodes and validates
        # them, so a malformed message is refused with a status that says why.
        enrollment = grpc.method_handlers_generic_handler(
            "accelguard.v1.Enrollment",
            {
                "Enroll": grpc.unary_unary_rpc_method_handler(
                    self._enroll, response_serializer=pb.EnrollResponse.SerializeToString
                )
            },
        )
        link = grpc.method_handlers_generic_handler(
            "accelguard.v1.NodeLink",
            {
                "Connect": grpc.stream_stream_rpc_method_handler(
                    self._connect, response_serializer=pb.Downlink.SerializeToString
                )
            },
        )
        return [enrollment, link]

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        if main is None:  # pragma: no cover - run() is always awaited inside a task
            raise LinkError("ControllerServer.run must run inside a task")
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, main.cancel)
        settings = self.settings
        server = grpc.aio.server(
            options=server_options(settings.keepalive_time_s, settings.keepalive_timeout_s)
        )
        server.add_generic_rpc_handlers(self._handlers())
        pair = [(self.pki.server_key_pem, self.pki.server_chain_pem)]
        try:
            self.enroll_port = server.add_secure_port(
                settings.enroll_listen, grpc.ssl_server_credentials(pair)
            )
            self.link_port = server.add_secure_port(
                settings.link_listen,
                grpc.ssl_server_credentials(
                    pair, root_certificates=self.pki.ca_pem, require_client_auth=True
                ),
            )
        except RuntimeError as error:
            raise LinkError(
                f"cannot listen on {settings.enroll_listen} / {settings.link_listen}: {error}"
            ) from error
        await server.start()
        write_private(
            settings.state_dir / "listening.json",
            json.dumps({"enroll_port": self.enroll_port, "link_port": self.link_port}).encode(),
        )
        log.info(
            "controller_listening", enroll_port=self.enroll_port, link_port=self.link_port,
            ca_fingerprint=self.pki.fingerprint, trust_domain=settings.trust_domain,
        )  # fmt: skip
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.committer.run(), name="committer")
                group.create_task(self.dispatcher.run(), name="commands")
                group.create_task(self.attestation.run(), name="attestation")
                group.create_task(self.admin.run(), name="admin")
                group.create_task(server.wait_for_termination(), name="grpc")
                if self.bridge is not None:
                    group.create_task(self.bridge.run(), name="mqtt-bridge")
        except asyncio.CancelledError:
            log.info("controller_stopping")
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            await asyncio.shield(server.stop(grace=1.0))
            await self.executor.call(self.store.close)
            self.executor.shutdown()
            log.info("controller_stopped")


def serve(config: ControllerConfig) -> int:
    asyncio.run(ControllerServer(config).run())
    return 0
