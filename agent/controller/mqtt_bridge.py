"""The controller's MQTT bridge (docs/edge.md): edge nodes' sessions that come through a broker.

The bridge is one MQTT client, the controller's own identity at the broker
(``controller@<trust-domain>``, a certificate of the controller CA). It subscribes to every
node's ``up`` and ``state`` and publishes to their ``down``. A node's identity is the topic it
published on, which the broker enforces (``use_identity_as_username`` and the ACL in
docs/edge/acl): a node can publish only to its own topics, so the topic names the certificate
that presented itself, never a field in the payload.

Each node's Uplinks carry its session id; a Hello starts a session, served by the same code as
a gRPC stream (``NodeLinkHandler.serve``: same validation, same (node, epoch, seq) deduplication,
same commands). What the broker delivers late or twice is sorted out here: a message of a
session that is not the node's current one is answered once with ``Closed`` (the node says
Hello again) and otherwise dropped; a report redelivered within a session is dropped by seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiomqtt
import grpc
import structlog

from agent.config import split_host_port
from agent.controller.link import NodeLinkHandler
from agent.controller.pki import ControllerPki, bridge_identity, issue_service_certificate
from agent.errors import LinkError, LinkProtocolError
from agent.identity.files import write_private
from agent.link.backoff import Backoff
from agent.link.mqtt import (
    BROKER_TIMEOUT_S,
    NO_DELAY,
    TOPIC_ROOT,
    client_tls,
    connect_properties,
    parse_state,
    parse_topic,
    reason_failed,
    topics,
)
from agent.link.wire import decode_uplink
from agent.proto.accelguard.v1 import link_pb2 as pb

log = structlog.get_logger(__name__)

# Uplinks waiting for one node's session, at most (the node keeps at most its send window of
# reports unacked, so a full queue means a node that ignores the protocol).
SESSION_QUEUE_LIMIT: Final = 8192


@dataclass
class _Route:
    session: bytes
    queue: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    last_seq: int = 0


@dataclass(frozen=True)
class BrokerState:
    """What a node last said on its retained state topic (or its Will said for it)."""

    state: str
    transport: str
    received_at: float


def bridge_credentials(pki: ControllerPki, directory: Path) -> tuple[Path, Path]:
    """The bridge's client key and certificate in ``directory``, issued on first use."""
    key, certificate = directory / "bridge.key", directory / "bridge.pem"
    if not (key.exists() and certificate.exists()):
        key_pem, chain = issue_service_certificate(
            pki, bridge_identity(pki.trust_domain), [], server=False
        )
        write_private(key, key_pem)
        write_private(certificate, chain)
    return key, certificate


class MqttBridge:
    def __init__(
        self,
        handler: NodeLinkHandler,
        pki: ControllerPki,
        broker: str,
        *,
        session_expiry_s: int,
        keepalive_s: int,
        # One connection to one broker: retrying it often costs nothing, and every second the
        # bridge is away the edge nodes' reports wait.
        backoff_base_s: float = 0.2,
        backoff_cap_s: float = 2.0,
    ) -> None:
        self._handler = handler
        self._pki = pki
        self._broker = broker
        self._session_expiry_s = session_expiry_s
        self._keepalive_s = keepalive_s
        self._backoff = Backoff(backoff_base_s, backoff_cap_s)
        self._client: aiomqtt.Client | None = None
        self._routes: dict[str, _Route] = {}
        # The session each node was last told is unknown: told once, not for every message.
        self._told: dict[str, bytes] = {}
        self.states: dict[str, BrokerState] = {}

    async def run(self) -> None:
        key, certificate = bridge_credentials(self._pki, self._pki.directory)
        host, port = split_host_port(self._broker, "controller.mqtt_broker")
        identity = bridge_identity(self._pki.trust_domain)
        while True:
            started = time.monotonic()
            try:
                await self._connection(
                    aiomqtt.Client(
                        host,
                        port,
                        identifier=identity,
                        protocol=aiomqtt.ProtocolVersion.V5,
                        tls_context=client_tls(self._pki.ca_pem, certificate, key),
                        clean_start=False,
                        properties=connect_properties(self._session_expiry_s),
                        keepalive=self._keepalive_s,
                        timeout=BROKER_TIMEOUT_S,
                        socket_options=NO_DELAY,
                    )
                )
            except (aiomqtt.MqttError, LinkError, OSError) as error:
                log.warning("mqtt_bridge_disconnected", broker=self._broker, error=str(error))
            finally:
                self._client = None
                self._end_all()
            if time.monotonic() - started >= 10.0:
                self._backoff.reset()
            await asyncio.sleep(self._backoff.next_delay())

    async def _connection(self, client: aiomqtt.Client) -> None:
        async with client:
            codes = await client.subscribe(
                [(f"{TOPIC_ROOT}/+/up", 1), (f"{TOPIC_ROOT}/+/state", 1)],
                timeout=BROKER_TIMEOUT_S,
            )
            if reason_failed(codes):
                raise LinkError(f"the broker refused the bridge's subscriptions: {codes}")
            self._client = client
            log.info("mqtt_bridge_connected", broker=self._broker)
            async for message in client.messages:
                await self._dispatch(message)

    def _end_all(self) -> None:
        for route in self._routes.values():
            route.queue.put_nowait(None)
        self._routes.clear()
        self._told.clear()

    async def _dispatch(self, message: aiomqtt.Message) -> None:
        parsed = parse_topic(str(message.topic))
        if parsed is None or not isinstance(message.payload, bytes | bytearray):
            return
        node_id, leaf = parsed
        payload = bytes(message.payload)
        if leaf == "state":
            self._state(node_id, payload)
        elif leaf == "up":
            try:
                uplink = decode_uplink(payload)
            except LinkProtocolError as error:
                # Nothing in it can be trusted, not even its session: drop it.
                log.warning("mqtt_bridge_bad_uplink", node=node_id, reason=str(error))
                return
            await self._uplink(node_id, uplink, payload)

    def _state(self, node_id: str, payload: bytes) -> None:
        try:
            state, transport = parse_state(payload)
        except LinkProtocolError as error:
            log.warning("mqtt_bridge_bad_state", node=node_id, reason=str(error))
            return
        previous = self.states.get(node_id)
        self.states[node_id] = BrokerState(state, transport, time.time())
        if previous is None or (previous.state, previous.transport) != (state, transport):
            log.info("mqtt_node_state", node=node_id, state=state, transport=transport)
        if state == "offline" or transport != "mqtt":
            route = self._routes.pop(node_id, None)
            if route is not None:
                route.queue.put_nowait(None)  # the node left MQTT: its session ends here

    async def _uplink(self, node_id: str, uplink: pb.Uplink, payload: bytes) -> None:
        session = bytes(uplink.session)
        route = self._routes.get(node_id)
        which = uplink.WhichOneof("message")
        if which == "hello":
            if not session:
                await self._close(node_id, session, grpc.StatusCode.INVALID_ARGUMENT,
                                  "an MQTT Hello must carry a session id")  # fmt: skip
                return
            if route is not None and route.session == session:
                return  # the same Hello delivered twice
            if route is not None:
                route.queue.put_nowait(None)
            route = _Route(session)
            route.queue.put_nowait(payload)
            route.task = asyncio.create_task(
                self._serve(node_id, route), name=f"mqtt-session-{node_id}"
            )
            self._routes[node_id] = route
            self._told.pop(node_id, None)
            return
        if route is None or route.session != session:
            if self._told.get(node_id) != session:
                self._told[node_id] = session
                await self._close(node_id, session, grpc.StatusCode.UNAVAILABLE,
                                  "no such session at the controller: say Hello again")  # fmt: skip
            return
        if which == "report":
            if uplink.report.seq <= route.last_seq:
                return  # delivered again within the session
            route.last_seq = uplink.report.seq
        if route.queue.qsize() >= SESSION_QUEUE_LIMIT:
            self._routes.pop(node_id, None)
            route.queue.put_nowait(None)
            await self._close(node_id, session, grpc.StatusCode.RESOURCE_EXHAUSTED,
                              "too many messages unanswered in one session")  # fmt: skip
            return
        route.queue.put_nowait(payload)

    async def _serve(self, node_id: str, route: _Route) -> None:
        async def requests() -> AsyncIterator[bytes]:
            while (item := await route.queue.get()) is not None:
                yield item

        async def send(message: pb.Downlink) -> None:
            await self._publish(node_id, route.session, message)

        try:
            closed = await self._handler.serve(node_id, requests(), send, "mqtt")
            if closed is not None:
                await self._close(node_id, route.session, *closed)
        finally:
            if self._routes.get(node_id) is route:
                del self._routes[node_id]

    async def _close(
        self, node_id: str, session: bytes, code: grpc.StatusCode, detail: str
    ) -> None:
        closed = pb.Downlink(closed=pb.Closed(code=code.name, detail=detail[:4096]))
        with contextlib.suppress(LinkError):
            await self._publish(node_id, session, closed)

    async def _publish(self, node_id: str, session: bytes, message: pb.Downlink) -> None:
        client = self._client
        if client is None:
            raise LinkError("the MQTT bridge has no broker connection")
        # The session is appended as its own encoding: the message itself is not changed.
        data = message.SerializeToString() + pb.Downlink(session=session).SerializeToString()
        try:
            await client.publish(topics(node_id).down, data, qos=1, timeout=BROKER_TIMEOUT_S)
        except aiomqtt.MqttError as error:
            raise LinkError(f"MQTT broker: publish to {node_id} failed: {error}") from None
