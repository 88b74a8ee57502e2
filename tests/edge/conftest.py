"""An edge fleet as real processes: a controller with its MQTT bridge, a real mosquitto
configured from docs/edge/, and two edge agents (own swtpm each, booted) whose gRPC goes
through a TCP proxy the test can block."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.bench.broker import Broker
from agent.controller.client import ControllerClient
from tests.link.support import Controller, LinkNode, TcpProxy, wait_for
from tests.link.test_commands import boot, configure_booted, tenants_parent, wait_trust

# A report every 100 ms (the heartbeat), fast fallback and failback.
EDGE_LINK = {
    "heartbeat_s": 0.1, "backoff_base_s": 0.1, "backoff_cap_s": 1.0,
    "keepalive_time_s": 1.0, "keepalive_timeout_s": 1.0,
    "fallback_after_s": 1.0, "failback_after_s": 1.0, "mqtt_keepalive_s": 2,
    # A Hello lost while the broker restarts is sent again after this (15 s by default).
    "hello_reply_timeout_s": 2.0,
}  # fmt: skip


@dataclass
class EdgeFleet:
    controller: Controller
    broker: Broker
    proxy: TcpProxy
    nodes: list[LinkNode]
    parent: Path

    def block_grpc(self) -> None:
        self.proxy.refusing.set()
        self.proxy.cut(reset=True)

    def unblock_grpc(self) -> None:
        self.proxy.refusing.clear()

    def summary(self, node: LinkNode) -> dict[str, Any]:
        return self.controller.ctl_json("node", "show", node.node_id)["summary"]  # type: ignore[no-any-return]

    def transport(self, node: LinkNode) -> str:
        """The transport ``ctl node show`` reports for ``node`` (its ``summary``), read through
        the client ``ctl`` uses (agent/controller/client.py) in this process: cheap to poll,
        where a ``ctl`` process per poll cost half a second of CPU."""
        with ControllerClient(self.controller.admin_socket) as client:
            return client.node(node.node_id).summary.transport

    def wait_transport(self, transport: str, timeout: float = 60) -> None:
        for node in self.nodes:
            wait_for(
                lambda node=node: self.transport(node) == transport,
                f"{node.node_id} connected over {transport}", timeout=timeout,
            )  # fmt: skip

    def crash_broker(self) -> None:
        """SIGKILL the broker as a crash finds one that has run a while: with persistence on,
        its database holds the sessions of a recent autosave. So the database is written first
        (SIGUSR1 does what autosave_interval does every 30 s), and a restart brings back the
        sessions and subscriptions of now. Killed within 30 s of its start, as it is in these
        tests, it would come back with none (nothing saved yet) whatever its persistence."""
        process = self.broker.process
        assert process is not None
        if self.broker.persistence:
            database = self.broker.data / "mosquitto.db"
            before = database.stat().st_mtime_ns if database.exists() else None
            process.send_signal(signal.SIGUSR1)
            wait_for(lambda: database.exists() and database.stat().st_mtime_ns != before,
                     "the broker's persistence database written")  # fmt: skip
        self.broker.stop(signal.SIGKILL)


def edge_start(node: LinkNode, fleet_proxy: TcpProxy, broker: Broker, parent: Path) -> None:
    link = {"controller": fleet_proxy.address, "mqtt_broker": broker.address, **EDGE_LINK}
    configure_booted(node, parent, link, node={"profile": "edge"})
    node.agent.start()


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[EdgeFleet]:
    with tenants_parent("accelguard-edge") as parent:
        controller = Controller(tmp_path / "controller")
        controller.init(attest_interval_s=3600.0, command_timeout_s=60.0)
        # mosquitto configured from docs/edge/ as shipped (agent/bench/broker.py).
        broker = Broker(controller.root / "pki", "test.fleet")
        broker.prepare()
        broker.start()
        controller.update_settings(mqtt_broker=broker.address)
        controller.start()
        proxy = TcpProxy(controller.link_port)
        nodes: list[LinkNode] = []
        try:
            for name in ("edgeA", "edgeB"):
                node = LinkNode(tmp_path / name, controller)
                nodes.append(node)
                boot(node)
                edge_start(node, proxy, broker, parent)
                result = node.enroll(controller.token(node.node_id))
                assert result.returncode == 0, result.stderr
            fleet = EdgeFleet(controller, broker, proxy, nodes, parent)
            for node in nodes:
                wait_trust(controller, node, "trusted")
            yield fleet
        finally:
            for node in nodes:
                node.close()
            controller.stop()
            broker.remove()
            proxy.close()
