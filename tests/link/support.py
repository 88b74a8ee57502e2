"""Real processes for link tests: a controller, simulated nodes (own swtpm each), a TCP proxy."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import config_as_dict, load_config, parse_config, to_toml
from agent.runtime.net import free_port
from agent.sim.node import init_sim_node
from agent.sim.swtpm import Swtpm
from tests.support import REPO, RunningAgent

CONTROLLER = [sys.executable, "-m", "agent.cli"]


def run_tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CONTROLLER, *args], capture_output=True, text=True, timeout=timeout, check=False,
        cwd=REPO,
    )  # fmt: skip


def wait_for(condition: Any, what: str, timeout: float = 60, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@dataclass
class Controller:
    root: Path
    enroll_port: int = 0
    link_port: int = 0
    fingerprint: str = ""
    process: subprocess.Popen[str] | None = None
    log_path: Path = field(default_factory=Path)

    @property
    def config_path(self) -> Path:
        return self.root / "controller.toml"

    @property
    def database(self) -> Path:
        return self.root / "controller.db"

    @property
    def admin_socket(self) -> Path:
        return Path(tomllib.loads(self.config_path.read_text())["controller"]["admin_socket"])

    @property
    def enroll_address(self) -> str:
        return f"127.0.0.1:{self.enroll_port}"

    @property
    def link_address(self) -> str:
        return f"127.0.0.1:{self.link_port}"

    def init(self, **settings: Any) -> None:
        self.enroll_port, self.link_port = free_port(), free_port()
        result = run_tool(
            "controller", "init", "--dir", str(self.root), "--trust-domain", "test.fleet",
            "--name", "127.0.0.1", "--name", "localhost",
            "--enroll-listen", self.enroll_address, "--link-listen", self.link_address,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        self.fingerprint = result.stdout.split("ca_fingerprint: ")[1].split()[0]
        if settings:
            self.update_settings(**settings)

    def update_settings(self, **settings: Any) -> None:
        document = tomllib.loads(self.config_path.read_text())
        document["controller"].update(settings)
        from agent.controller.config import (  # noqa: PLC0415
            controller_config_toml,
            parse_controller_config,
        )

        self.config_path.write_text(controller_config_toml(parse_controller_config(document)))

    def start(self) -> None:
        self.log_path = self.root / f"controller-{time.monotonic_ns()}.log"
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [*CONTROLLER, "controller", "serve", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO,
            )  # fmt: skip
        socket_path = self.admin_socket
        wait_for(
            lambda: socket_path.exists() or self.process is None or self.process.poll() is not None,
            "the controller to listen",
        )
        assert self.process.poll() is None, self.log()
        wait_for(lambda: self.ctl("nodes").returncode == 0, "the controller admin socket")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=30)
        self.process = None
        return code

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_tool("ctl", "--controller-config", str(self.config_path), *args)

    def ctl_json(self, *args: str) -> Any:
        result = self.ctl(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def token(self, node_id: str, ttl: str = "1h") -> str:
        result = self.ctl("token", "create", "--node-id", node_id, "--ttl", ttl)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.database, timeout=30)) as db:
            return list(db.execute(sql, args))

    def report_seqs(self, node_id: str) -> list[int]:
        return [row[0] for row in self.query(
            "SELECT seq FROM reports WHERE node_id = ? ORDER BY seq", node_id)]  # fmt: skip


@dataclass
class LinkNode:
    """A simulated node with its own swtpm and its agent process."""

    root: Path
    controller: Controller
    mig_enabled: bool = False
    swtpm: Swtpm = field(init=False)
    agent: RunningAgent = field(init=False)

    def __post_init__(self) -> None:
        node = init_sim_node(self.root, "h100x2", mig_enabled=self.mig_enabled, slice_bytes=1 << 20)
        self.swtpm = Swtpm(self.root / "swtpm")
        self.swtpm.start()
        self.agent = RunningAgent(node=node, config=load_config(node.config_path))

    @property
    def node_id(self) -> str:
        return self.agent.config.node.id

    @property
    def config_path(self) -> Path:
        return self.agent.config_path

    def configure(self, link: dict[str, Any], **sections: dict[str, Any]) -> None:
        document = config_as_dict(load_config(self.config_path))
        document["attest"]["tcti"] = self.swtpm.tcti
        document["link"].update({"cert_dir": str(self.root / "link"), **link})
        for name, values in sections.items():
            document[name].update(values)
        config = parse_config(document)
        self.config_path.write_text(to_toml(config))
        self.agent.config = config

    def enroll(self, token: str, *extra: str, address: str | None = None,
               fingerprint: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        return run_tool(
            "--config", str(self.config_path), "enroll",
            "--controller", address or self.controller.enroll_address, "--token", token,
            "--ca-fingerprint", fingerprint or self.controller.fingerprint, *extra,
        )  # fmt: skip

    def outbox(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        path = self.agent.config.node.store_path
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
            return list(db.execute(sql, args))

    def meta(self, key: str) -> int:
        rows = self.outbox("SELECT value FROM meta WHERE key = ?", key)
        return int(rows[0][0]) if rows else 0

    def last_seq(self) -> int:
        rows = self.outbox("SELECT seq FROM sqlite_sequence WHERE name = 'link_outbox'")
        return int(rows[0][0]) if rows else 0

    def unacked(self) -> int:
        return int(self.outbox("SELECT COUNT(*) FROM link_outbox WHERE acked_at IS NULL")[0][0])

    def close(self) -> None:
        if self.agent.process is not None:
            self.agent.stop(signal.SIGKILL)
        self.swtpm.stop()


class TcpProxy:
    """A TCP proxy the test controls: forward, drop (close both sides), stall (stop moving
    bytes, keep the connections), or reset (RST both sides)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        # Stall one direction or both: "up" is node -> controller, "down" controller -> node.
        self.stalled = {"up": threading.Event(), "down": threading.Event()}
        self.refusing = threading.Event()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.refusing.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            for source, sink, direction in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(
                    target=self._pump, args=(source, sink, direction), daemon=True
                ).start()

    def stall(self, *directions: str) -> None:
        for direction in directions:
            self.stalled[direction].set()

    def resume(self) -> None:
        for event in self.stalled.values():
            event.clear()

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        source.settimeout(0.2)
        while not self._stop.is_set():
            if self.stalled[direction].is_set():
                time.sleep(0.05)
                continue
            try:
                data = source.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            try:
                sink.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def cut(self, *, reset: bool) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                if reset:  # SO_LINGER 0: close sends RST
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                with contextlib.suppress(OSError):
                    sock.close()

    def close(self) -> None:
        self._stop.set()
        self.cut(reset=False)
        self.listener.close()


@contextlib.contextmanager
def link_nodes(tmp: Path, controller: Controller, count: int) -> Iterator[list[LinkNode]]:
    nodes: list[LinkNode] = []
    try:
        for index in range(count):
            nodes.append(LinkNode(tmp / f"node{'AB'[index] if index < 2 else index}", controller))
        yield nodes
    finally:
        for node in nodes:
            node.close()


def env_without_proxy() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
