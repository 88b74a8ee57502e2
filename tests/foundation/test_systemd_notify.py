"""The notify protocol against a real datagram socket, as systemd would receive it."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_config
from agent.sim.node import SimNode
from tests.support import RunningAgent


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    try:
        yield sock, path
    finally:
        sock.close()


def _receive_until(sock: socket.socket, wanted: str) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        message = sock.recv(4096).decode()
        seen.append(message)
        if wanted in message.split("\n"):
            return seen
    raise AssertionError(f"never received {wanted}; got {seen}")


def test_ready_watchdog_status_and_stopping(
    sim_node: SimNode, notify_socket: tuple[socket.socket, Path]
) -> None:
    sock, path = notify_socket
    agent = RunningAgent(node=sim_node, config=load_config(sim_node.config_path))
    agent.start(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}, wait=False)
    try:
        first = _receive_until(sock, "READY=1")
        ready = first[-1].split("\n")
        assert any(f.startswith("STATUS=2 GPUs") for f in ready), ready
        # The watchdog keeps coming from the event loop, more than once.
        _receive_until(sock, "WATCHDOG=1")
        _receive_until(sock, "WATCHDOG=1")
        assert agent.stop(signal.SIGTERM) == 0
        _receive_until(sock, "STOPPING=1")
    finally:
        if agent.process is not None:
            agent.stop(signal.SIGKILL)


def test_no_notify_socket_means_no_notifications(agent: RunningAgent) -> None:
    # Outside systemd the agent runs normally and exits cleanly on SIGINT.
    assert agent.cli("status").returncode == 0
    assert agent.stop(signal.SIGINT) == 0
    assert '"event": "agent_stopped"' in agent.log()
