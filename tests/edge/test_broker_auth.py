"""The broker enforces who is who (docs/edge/acl as shipped): a node reaches only its own
topics, a certificate of another CA does not connect at all, and a command that reaches a node's
``down`` topic without the controller's signature is refused by the node itself."""

from __future__ import annotations

import asyncio
import datetime
import ssl
import threading
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.link.envelope import (
    COMMAND_CONTEXT,
    CommandKey,
    command_key_id,
    load_command_public_key,
    new_envelope,
    sign_command,
)
from agent.link.mqtt import client_tls, topics
from agent.proto.accelguard.v1 import link_pb2 as pb
from tests.edge.conftest import EdgeFleet
from tests.link.support import LinkNode, wait_for
from tests.link.test_commands import run

NOT_AUTHORIZED = 0x87
CORDON_KEY = "commands_cordoned"  # agent/store/commands.py


class Client:
    """A plain paho MQTT 5 client that records the broker's reason codes."""

    def __init__(self, fleet: EdgeFleet, context: ssl.SSLContext, client_id: str) -> None:
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        self.client.tls_set_context(context)
        self.connected = threading.Event()
        self.codes: dict[int, list[int]] = {}
        self.done: dict[int, threading.Event] = {}
        self.client.on_connect = lambda *_: self.connected.set()
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.received: list[str] = []
        self.client.on_message = lambda _c, _u, message: self.received.append(message.topic)
        host, port = fleet.broker.address.split(":")
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert self.connected.wait(10), "no CONNACK"

    def _record(self, mid: int, codes: list[Any]) -> None:
        self.codes[mid] = [int(getattr(code, "value", code)) for code in codes]
        self.done.setdefault(mid, threading.Event()).set()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: list[Any], _p: Any) -> None:
        self._record(mid, codes)

    def _on_publish(self, _c: Any, _u: Any, mid: int, code: Any, _p: Any) -> None:
        self._record(mid, [code])

    def _wait(self, mid: int) -> list[int]:
        assert self.done.setdefault(mid, threading.Event()).wait(10), "no answer from the broker"
        return self.codes[mid]

    def subscribe(self, topic: str) -> list[int]:
        _, mid = self.client.subscribe(topic, qos=1)
        return self._wait(mid)

    def publish(self, topic: str, payload: bytes) -> list[int]:
        info = self.client.publish(topic, payload, qos=1)
        return self._wait(info.mid)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _node_tls(node: LinkNode) -> ssl.SSLContext:
    link = node.root / "link"
    return client_tls(link / "ca.pem", link / "node.pem", link / "node.key")


def _foreign_identity(directory: Path, common_name: str) -> ssl.SSLContext:
    """A CA of its own and a client certificate for ``common_name`` from it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the controller CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(1)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    (directory / "key.pem").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
    (directory / "cert.pem").write_bytes(certificate.public_bytes(pem) + ca.public_bytes(pem))
    # It trusts the real broker (the controller CA): only its own certificate is foreign.
    real_ca = next(iter(directory.parent.glob("edgeA/link/ca.pem")))
    return client_tls(real_ca, directory / "cert.pem", directory / "key.pem")


def _refusals(node: LinkNode) -> list[tuple[bytes, str]]:
    return [(bytes(row[0]), row[1]) for row in node.outbox(
        "SELECT command_id, reason FROM command_refusals ORDER BY id")]  # fmt: skip


def test_the_broker_keeps_each_node_to_its_own_topics(edge: EdgeFleet, tmp_path: Path) -> None:
    node_a, node_b = edge.nodes
    edge.block_grpc()
    edge.wait_transport("mqtt")
    mine, theirs = topics(node_a.node_id), topics(node_b.node_id)
    # Node A's certificate (its agent stopped: the broker makes the certificate's CN the client
    # id, so the two would take the session from each other): connected, held to its own topics.
    assert node_a.agent.stop() == 0
    spy = Client(edge, _node_tls(node_a), "spy")
    try:
        # mosquitto grants a subscription and checks read access on each delivery: B's
        # commands and acks must never reach A, whatever it subscribed to.
        for topic in (theirs.down, "accelguard/v1/+/down", theirs.up, "#"):
            spy.subscribe(topic)
        code, status = run(edge.controller, "uncordon", "--node", node_b.node_id)
        assert code == 0 and status["state"] == "done", status
        hello = pb.Uplink(hello=pb.Hello(agent_version="x", epoch=1), session=b"s" * 16)
        assert spy.publish(theirs.up, hello.SerializeToString()) == [NOT_AUTHORIZED]
        assert spy.publish(theirs.state, b'{"state": "offline"}') == [NOT_AUTHORIZED]
        # Only the controller writes to a down topic, a node's own included.
        key = CommandKey(Ed25519PrivateKey.generate())
        envelope = new_envelope(node_a.node_id, 60)
        envelope.cordon.CopyFrom(pb.CordonCommand(reason="forged"))
        forged = pb.Downlink(command=sign_command(key, envelope)).SerializeToString()
        assert spy.publish(mine.down, forged) == [NOT_AUTHORIZED]
    finally:
        spy.close()
    assert spy.received == [], "node A's certificate read another node's topics"
    # What was refused never reached anyone: B's session and state are as they were.
    summary = edge.summary(node_b)
    assert summary["connected"] and summary["transport"] == "mqtt"
    assert summary["broker_state"] == "online mqtt"
    assert not any(reason for _, reason in _refusals(node_a))

    # A certificate of another CA, naming node B: the TLS handshake fails.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    context = _foreign_identity(foreign, node_b.node_id)

    async def connect() -> None:
        host, port = edge.broker.address.split(":")
        async with aiomqtt.Client(host, int(port), identifier=node_b.node_id,
                                  protocol=aiomqtt.ProtocolVersion.V5, tls_context=context,
                                  timeout=10):  # fmt: skip
            pass

    with pytest.raises(aiomqtt.MqttError):
        asyncio.run(connect())

    # A command that does reach A's down topic (published with the controller's own broker
    # identity, as a stolen broker account would; the controller stopped meanwhile) but is not
    # signed by the controller's command key: the node refuses it and runs nothing.
    node_a.agent.start()
    wait_for(lambda: edge.summary(node_a)["transport"] == "mqtt", "A back on MQTT", timeout=60)
    edge.controller.stop()
    pki = edge.controller.root / "pki"
    controller_tls = client_tls(pki / "ca.pem", pki / "bridge.pem", pki / "bridge.key")
    intruder = Client(edge, controller_tls, "intruder")
    try:
        # The key id of the controller's real command key, the signature by another key.
        pinned = command_key_id(load_command_public_key((pki / "command.pub").read_bytes(), "key"))
        envelope = new_envelope(node_a.node_id, 60)
        envelope.cordon.CopyFrom(pb.CordonCommand(reason="forged"))
        envelope.key_id = pinned
        data = envelope.SerializeToString()
        signed = pb.SignedCommand(
            envelope=data, signature=Ed25519PrivateKey.generate().sign(COMMAND_CONTEXT + data)
        )
        assert intruder.publish(mine.down, pb.Downlink(command=signed).SerializeToString()) == [0]
    finally:
        intruder.close()
        edge.controller.start()
    wait_for(lambda: (envelope.command_id, "signature") in _refusals(node_a),
             "the forged command refused for its signature")  # fmt: skip
    assert node_a.outbox("SELECT COUNT(*) FROM commands WHERE id = ?", envelope.command_id) == [
        (0,)
    ]
    assert node_a.outbox("SELECT value FROM meta WHERE key = ?", CORDON_KEY) in ([], [("0",)])
