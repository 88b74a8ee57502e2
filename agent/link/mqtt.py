"""The link over MQTT (docs/edge.md): a transport, not a second protocol.

The node's conversation with the controller (agent/link/service.py) is the same on both
transports: Hello / HelloReply, reports with their seqs, cumulative acks, signed commands. Here
one broker connection carries one *session*: a random id in every Uplink, echoed in the
controller's Downlinks, so that a message the broker delivers late (after a reconnect, from a
persistent session) is never taken for part of the current conversation. Commands are taken
whatever session they name: each is signed and checked on its own (agent/link/commands.py).

Topics, per node: ``accelguard/v1/<node>/up`` (QoS 1, Uplinks), ``accelguard/v1/<node>/down``
(QoS 1, Downlinks) and the retained ``accelguard/v1/<node>/state`` (JSON: online or offline, and
the transport), with a Will that says offline. The broker authenticates the node by its enrolled
certificate and its ACL lets it publish only to its own ``up`` and ``state`` and read only its own
``down`` (docs/edge/acl).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import split_host_port
from agent.errors import LinkError, LinkProtocolError
from agent.identity.spiffe import NODE_ID
from agent.identity.tls import IdentityPaths
from agent.link.wire import decode_downlink
from agent.proto.accelguard.v1 import link_pb2 as pb
from agent.runtime.tasks import cancel_and_wait

log = structlog.get_logger(__name__)

TOPIC_ROOT: Final = "accelguard/v1"
SESSION_BYTES: Final = 16
# How long a publish or subscribe may wait for the broker's answer before the connection is
# given up as dead.
BROKER_TIMEOUT_S: Final = 10.0
# Downlinks waiting to be read, at most: the controller sends acks and commands, both small.
INBOX_LIMIT: Final = 4096
# Small messages each awaited by the other side (a report, its ack): never hold one back for
# Nagle's algorithm (with delayed ACKs that costs about 40 ms per hop).
NO_DELAY: Final = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


@dataclass(frozen=True)
class Topics:
    up: str
    down: str
    state: str


def topics(node_id: str) -> Topics:
    base = f"{TOPIC_ROOT}/{node_id}"
    return Topics(up=f"{base}/up", down=f"{base}/down", state=f"{base}/state")


_NODE_TOPIC: Final = re.compile(re.escape(TOPIC_ROOT) + rf"/({NODE_ID.pattern})/(up|down|state)")


def parse_topic(topic: str) -> tuple[str, str] | None:
    """(node id, leaf) of one of the link's topics; None for anything else."""
    match = _NODE_TOPIC.fullmatch(topic)
    return (match.group(1), match.group(2)) if match is not None else None


def state_payload(state: str, transport: str) -> bytes:
    return json.dumps(
        {"state": state, "transport": transport, "at": round(time.time(), 3)}, sort_keys=True
    ).encode()


def parse_state(payload: bytes) -> tuple[str, str]:
    """(state, transport) of a state message; LinkProtocolError when it is not one."""
    try:
        document = json.loads(payload[:1024].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise LinkProtocolError(f"state message is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise LinkProtocolError("state message is not a JSON object")
    state, transport = document.get("state"), document.get("transport", "")
    if state not in ("online", "offline") or transport not in ("", "grpc", "mqtt"):
        raise LinkProtocolError(f"state message {document!r:.120}: unknown state or transport")
    return str(state), str(transport)


def client_tls(
    ca: bytes | os.PathLike[str], certificate: os.PathLike[str], key: os.PathLike[str]
) -> ssl.SSLContext:
    """TLS 1.2+ with a client certificate, trusting only ``ca`` (PEM bytes or a file)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if isinstance(ca, bytes):
        context.load_verify_locations(cadata=ca.decode("ascii"))
    else:
        context.load_verify_locations(cafile=os.fspath(ca))
    context.load_cert_chain(os.fspath(certificate), os.fspath(key))
    return context


def connect_properties(session_expiry_s: int) -> Properties:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = session_expiry_s
    return properties


def reason_failed(codes: Any) -> bool:
    """Whether a SUBACK refused any of its topics (reason code 0x80 or above)."""
    return any(int(getattr(code, "value", code)) >= 0x80 for code in codes)


class MqttCall:
    """One MQTT session as the conversation sees a stream: ``write`` an Uplink, ``read`` the
    next Downlink of this session (or any command)."""

    def __init__(self, client: aiomqtt.Client, node_topics: Topics, session: bytes) -> None:
        self._client = client
        self._topics = node_topics
        self.session = session
        # Appended to every Uplink: protobuf merges concatenated encodings, so the session field
        # is added without decoding what the conversation wrote.
        self._suffix = pb.Uplink(session=session).SerializeToString()
        self._inbox: asyncio.Queue[bytes | BaseException] = asyncio.Queue(INBOX_LIMIT)
        # Where the node goes when this session ends cleanly ("grpc": failback); the retained
        # state says so.
        self.leaving_for = ""

    async def write(self, data: bytes) -> None:
        try:
            await self._client.publish(
                self._topics.up, data + self._suffix, qos=1, timeout=BROKER_TIMEOUT_S
            )
        except aiomqtt.MqttError as error:
            raise LinkError(f"MQTT broker: publish failed: {error}") from None

    async def read(self) -> bytes:
        item = await self._inbox.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def pump(self, messages: AsyncIterator[aiomqtt.Message]) -> None:
        """Sort what the broker delivers into this session's inbox; end the session (by the
        next ``read`` raising) when the broker connection ends."""
        try:
            async for message in messages:
                if str(message.topic) != self._topics.down or not isinstance(
                    message.payload, bytes | bytearray
                ):
                    continue
                data = bytes(message.payload)
                try:
                    downlink = decode_downlink(data)
                except LinkProtocolError as error:
                    # Only the controller may publish here (the broker's ACL): a broken message
                    # is dropped, it must not end a healthy session.
                    log.warning("link_mqtt_bad_downlink", error=str(error))
                    continue
                if downlink.session != self.session and downlink.WhichOneof("message") != "command":
                    continue  # an earlier session's ack, reply or close
                await self._inbox.put(data)
        except aiomqtt.MqttError as error:
            await self._inbox.put(LinkError(f"MQTT broker: connection lost: {error}"))
        else:
            await self._inbox.put(LinkError("MQTT broker: the connection ended"))


@contextlib.asynccontextmanager
async def connected(
    *,
    node_id: str,
    broker: str,
    paths: IdentityPaths,
    session_expiry_s: int,
    keepalive_s: int,
) -> AsyncIterator[MqttCall]:
    """A broker connection as the node: TLS with its enrolled certificate, a persistent session,
    the state retained as online (the Will says offline), its ``down`` topic subscribed; yields
    the session's call and, on the way out, says which transport it leaves for."""
    host, port = split_host_port(broker, "link.mqtt_broker")
    node_topics = topics(node_id)
    try:
        context = client_tls(paths.ca, paths.certificate, paths.key)
    except (OSError, ssl.SSLError) as error:
        raise LinkError(f"MQTT: the node's TLS identity is unusable: {error}") from None
    will = aiomqtt.Will(node_topics.state, state_payload("offline", ""), qos=1, retain=True)
    client = aiomqtt.Client(
        host,
        port,
        identifier=node_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=context,
        will=will,
        clean_start=False,
        properties=connect_properties(session_expiry_s),
        keepalive=keepalive_s,
        timeout=BROKER_TIMEOUT_S,
        socket_options=NO_DELAY,
    )
    try:
        async with client:
            codes = await client.subscribe(node_topics.down, qos=1, timeout=BROKER_TIMEOUT_S)
            if reason_failed(codes):
                raise LinkError(
                    f"MQTT broker refused the subscription to {node_topics.down}: {codes}"
                )
            await client.publish(node_topics.state, state_payload("online", "mqtt"), qos=1,
                                 retain=True, timeout=BROKER_TIMEOUT_S)  # fmt: skip
            call = MqttCall(client, node_topics, os.urandom(SESSION_BYTES))
            pump = asyncio.create_task(call.pump(client.messages), name="link-mqtt-pump")
            try:
                yield call
            finally:
                await cancel_and_wait(pump)
                # Leaving cleanly (failback, shutdown) sends no Will: say it ourselves.
                state = ("online", "grpc") if call.leaving_for == "grpc" else ("offline", "")
                with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                    await client.publish(node_topics.state, state_payload(*state), qos=1,
                                         retain=True, timeout=2.0)  # fmt: skip
    except aiomqtt.MqttError as error:
        raise LinkError(f"MQTT broker {broker}: {error}") from None
