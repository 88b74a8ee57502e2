"""``accelguard bench link``: the controller link's latency and fan-in, one JSON document, each
number beside a baseline measured in the same run against the same controller.

* **Round trip**: one node runs the real link service (``LinkService``, its SQLite outbox in a
  journal of its own) against a controller process; a report's round trip is from ``publish``
  (enqueue in the outbox, fsynced) to the node having stored the controller's ack (the ack is
  sent only once the report is committed at the controller). Baseline, alternating with it: a
  bare unary gRPC call on the very TLS channel the link dialled, to a method nobody implements
  (the controller's gRPC answers ``UNIMPLEMENTED`` without running any handler): the floor of one
  request/response on that channel.
* **Commands**: ``ctl`` to result for a remote lease grant and a remote attest, beside the
  local admin calls doing the same work (agent/bench/commands.py).
* **Fan-in**: N lightweight link clients in this process (asyncio, each its own TLS connection
  with its own node certificate, Hello, then one health report per heartbeat at a random phase,
  acks timed) against one controller process pinned to one core (``taskset``), for N = 100,
  1000, 2000 by default (clients are added between steps). For each N: reports/s, ack latency
  percentiles of the reports sent in the measuring window (late acks are waited for and
  counted), the controller's CPU use of its core, and, as the same-run baseline, bare unary
  calls made meanwhile to the same loaded controller. The aim (2000 nodes at a heartbeat each
  10 s on one core with p99 ack < 100 ms) is reported as met or not, with the reason.

Client certificates are minted with the controller's CA files and the nodes recorded as
enrolled (unattested) in its store, what ``accelguard enroll`` leaves behind without the TPM
round trips; the controller takes each client's identity from its certificate as for any node.
The CLI builds :func:`add_bench_parser` on every start, so only the standard library is imported
at the top; gRPC, cryptography and the link are imported where they are used. Over 600 lines:
one benchmark (controller process, node round trip, fan-in clients, CLI) kept in one module.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from agent.bench.common import bench_scratch, cpu_seconds, latency
from agent.errors import LinkError, ValidationError
from agent.runtime.tasks import cancel_and_wait

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Iterator, Sequence

    import grpc

DEFAULT_FAN_IN: Final = (100, 1000, 2000)
DEFAULT_HEARTBEAT_S: Final = 10.0
DEFAULT_ROUNDS: Final = 200
QUICK_FAN_IN: Final = (5, 20)
QUICK_HEARTBEAT_S: Final = 0.5
QUICK_WINDOW_S: Final = 1.5
QUICK_ROUNDS: Final = 20
DEFAULT_COMMAND_ROUNDS: Final = 30
QUICK_COMMAND_ROUNDS: Final = 3
WARMUP_ROUNDS: Final = 10
# The aim of the issue: this many nodes, a heartbeat this often, on one controller core.
AIM_NODES: Final = 2000
AIM_HEARTBEAT_S: Final = 10.0
AIM_P99_MS: Final = 100.0
TRUST_DOMAIN: Final = "bench.fleet"
# A method no server implements: gRPC answers it without running a handler (the baseline).
PROBE_METHOD: Final = "/accelguard.v1.NodeLink/BenchProbe"
# TLS handshakes in flight while clients connect (a restart's reconnect storm, bounded).
CONNECT_CONCURRENCY: Final = 64
# Baseline probes on the loaded controller during a fan-in window.
PROBE_INTERVAL_S: Final = 0.05
# Reports sent in the window whose ack has not come this long after it are counted unacked.
ACK_GRACE_S: Final = 10.0
START_TIMEOUT_S: Final = 60.0
NODE_CERT_LIFETIME_S: Final = 24 * 3600.0
# The link's default keepalive (agent.toml [link]): what a real node's connection carries.
KEEPALIVE_S: Final = 10.0


# --- identities -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeCredentials:
    """A node's TLS key and certificate (signed by the controller CA) and the CA to trust."""

    node_id: str
    key_pem: bytes
    certificate_pem: bytes
    ca_pem: bytes

    def channel_credentials(self) -> grpc.ChannelCredentials:
        import grpc  # noqa: PLC0415 - see the module docstring

        return grpc.ssl_channel_credentials(self.ca_pem, self.key_pem, self.certificate_pem)

    def write(self, cert_dir: Path) -> None:
        """The files ``accelguard enroll`` writes (key, certificate, pinned CA), 0600."""
        from agent.identity.files import write_private  # noqa: PLC0415
        from agent.identity.tls import IdentityPaths  # noqa: PLC0415

        paths = IdentityPaths(cert_dir)
        write_private(paths.key, self.key_pem)
        write_private(paths.certificate, self.certificate_pem)
        write_private(paths.ca, self.ca_pem)


def provision_nodes(
    pki_dir: Path, trust_domain: str, database: Path, node_ids: Sequence[str]
) -> list[NodeCredentials]:
    """Certificates for ``node_ids`` signed with the controller's CA files, and the nodes
    recorded as enrolled (unattested) in its store: what enrollment leaves behind, without the
    token and TPM round trips. The controller may be running (its store is WAL)."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

    from agent.controller.pki import ControllerPki  # noqa: PLC0415
    from agent.controller.store import NodeEnrollment, SqliteControllerStore  # noqa: PLC0415
    from agent.identity.node_key import NodeKey  # noqa: PLC0415
    from agent.identity.tls import make_csr  # noqa: PLC0415

    pki = ControllerPki(pki_dir, trust_domain)
    scrub_key_pem = NodeKey.generate().public_pem()
    store = SqliteControllerStore(database)
    issued_nodes: list[NodeCredentials] = []
    try:
        for node_id in node_ids:
            key = ec.generate_private_key(ec.SECP256R1())
            issued = pki.sign_node(make_csr(key, node_id), node_id, NODE_CERT_LIFETIME_S)
            store.complete_enrollment(
                None,
                NodeEnrollment(
                    node_id=node_id, spiffe_id=issued.spiffe_id, attestation="unattested",
                    ek_public=b"", ek_certificate=b"", ak_public=b"", ak_name=b"",
                    scrub_key_pem=scrub_key_pem, cert_serial=issued.serial,
                    cert_not_after=issued.not_after, agent_version="bench",
                ),
            )  # fmt: skip
            key_pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            certificate_pem = issued.certificate.public_bytes(serialization.Encoding.PEM)
            issued_nodes.append(NodeCredentials(node_id, key_pem, certificate_pem, pki.ca_pem))
    finally:
        store.close()
    return issued_nodes


# --- the controller process -------------------------------------------------------------------


def _thread_ids(pid: int | str) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(entry.name) for entry in Path(f"/proc/{pid}/task").iterdir()]
    return []


@contextlib.contextmanager
def pinned_self(cpus: set[int]) -> Iterator[None]:
    """Run this process (every thread it has now, and those they start) on ``cpus``."""
    previous: dict[int, set[int]] = {}
    for tid in _thread_ids("self"):
        with contextlib.suppress(OSError):
            previous[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
    try:
        yield
    finally:
        for tid, mask in previous.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, mask)


class BenchController:
    """A controller process (``python -m agent.cli controller serve``) with its state in
    ``directory``, listening on kernel-chosen ports, pinned to ``cpu`` when given."""

    def __init__(self, directory: Path, cpu: int | None, log_level: str = "info") -> None:
        self.directory = directory
        self.cpu = cpu
        self.log_level = log_level
        self.process: Any = None  # subprocess.Popen, imported with the process
        self.link_port = 0
        self.pinning = "not pinned"
        self.pki_dir = directory / "pki"
        self.database = directory / "controller.db"
        self.config_path = directory / "controller.toml"
        self.admin_socket = directory / "controller.sock"
        self.log_path = directory / "controller.log"

    @property
    def link_address(self) -> str:
        return f"127.0.0.1:{self.link_port}"

    def init(self) -> None:
        from agent.controller.pki import init_pki  # noqa: PLC0415

        init_pki(self.pki_dir, TRUST_DOMAIN, ["127.0.0.1", "localhost"])
        self.configure()

    def configure(self, **settings: Any) -> None:
        """Write controller.toml, with ``settings`` over the bench's own (next start)."""
        from agent.controller.config import (  # noqa: PLC0415
            controller_config_toml,
            parse_controller_config,
        )

        parsed = parse_controller_config(
            {
                "controller": {
                    "state_dir": str(self.directory), "trust_domain": TRUST_DOMAIN,
                    "enroll_listen": "127.0.0.1:0", "link_listen": "127.0.0.1:0",
                    "admin_socket": str(self.admin_socket), **settings,
                },
                "logging": {"level": self.log_level},
            }
        )  # fmt: skip
        self.config_path.write_text(controller_config_toml(parsed))

    def provision(self, node_ids: Sequence[str]) -> list[NodeCredentials]:
        return provision_nodes(self.pki_dir, TRUST_DOMAIN, self.database, node_ids)

    def start(self) -> None:
        import json  # noqa: PLC0415
        import shutil  # noqa: PLC0415
        import subprocess  # noqa: PLC0415

        import agent  # noqa: PLC0415 - where the package lives, for the child's path

        listening = self.directory / "listening.json"
        listening.unlink(missing_ok=True)
        command = [sys.executable, "-m", "agent.cli", "controller", "serve", "--config",
                   str(self.config_path)]  # fmt: skip
        taskset = shutil.which("taskset")
        if self.cpu is not None and taskset is not None:
            command = [taskset, "-c", str(self.cpu), *command]
            self.pinning = f"taskset -c {self.cpu}"
        source_root = str(Path(agent.__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (source_root, os.environ.get("PYTHONPATH")) if p)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=source_root,
                env={**os.environ, "PYTHONPATH": path},
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while not listening.exists() or not self.admin_socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise LinkError(f"the bench controller did not start: {self.log_tail()}")
            time.sleep(0.05)
        self.link_port = int(json.loads(listening.read_text())["link_port"])
        if self.cpu is not None and taskset is None:
            # No taskset: pin every thread it has now (later ones inherit from their creator).
            for tid in _thread_ids(self.process.pid):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, {self.cpu})
            self.pinning = f"taskset missing: os.sched_setaffinity({self.cpu}) after start"

    def cpu_seconds(self) -> float:
        return 0.0 if self.process is None else cpu_seconds(self.process.pid)

    def rss_bytes(self) -> int:
        with contextlib.suppress(OSError, ValueError, IndexError, AttributeError):
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> int:
        from agent.runtime.process import stop_process  # noqa: PLC0415

        if self.process is None:
            return 0
        code = stop_process(self.process)
        self.process = None
        return code


# --- round trip: the real node link service ---------------------------------------------------


async def probe(channel: Any) -> float:
    """Seconds of one bare unary call on ``channel`` (answered UNIMPLEMENTED by gRPC itself)."""
    import grpc  # noqa: PLC0415

    start = time.perf_counter()
    try:
        await channel.unary_unary(PROBE_METHOD)(b"", timeout=30)
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise LinkError(
                f"baseline call failed: {error.code().name}: {error.details()}"
            ) from None
    return time.perf_counter() - start


def _observed_link_service(config: Any, store: Any, executor: Any) -> Any:
    """The node's link service as the daemon runs it, plus two things for the bench only: the
    channel it dialled (for the baseline call on the same TLS connection) and ack notices."""
    import asyncio  # noqa: PLC0415

    import grpc  # noqa: PLC0415

    from agent.identity.tls import load_identity  # noqa: PLC0415
    from agent.link.channel import NODE_LINK_METHOD, client_options  # noqa: PLC0415
    from agent.link.service import LinkService  # noqa: PLC0415
    from agent.store.outbox import Outbox  # noqa: PLC0415

    loop = asyncio.get_running_loop()

    class ObservedOutbox(Outbox):
        def ack_through(self, seq: int) -> None:  # on the executor's thread
            super().ack_through(seq)
            loop.call_soon_threadsafe(service.note_ack, seq)

    class ObservedLinkService(LinkService):
        channel: Any = None
        acked = 0

        def note_ack(self, seq: int) -> None:
            self.acked = max(self.acked, seq)
            ack_seen.set()

        async def acked_through(self, seq: int) -> None:
            while self.acked < seq:
                ack_seen.clear()
                await ack_seen.wait()

        async def _session(self) -> None:
            # LinkService._session, keeping the channel.
            identity = await self._executor.call(load_identity, self._paths)
            credentials = grpc.ssl_channel_credentials(
                identity.ca_pem, identity.key_pem, identity.certificate_pem
            )
            options = client_options(
                self._settings.keepalive_time_s, self._settings.keepalive_timeout_s
            )
            async with grpc.aio.secure_channel(
                self._settings.controller, credentials, options=options
            ) as channel:
                self.channel = channel
                call = channel.stream_stream(NODE_LINK_METHOD)()
                try:
                    await self._converse(call)
                finally:
                    self.channel = None
                    call.cancel()

    ack_seen = asyncio.Event()
    service = ObservedLinkService(config, store, executor)
    service.outbox = ObservedOutbox(store, service.outbox.limits)
    return service


async def _round_trip(
    controller: BenchController, node: NodeCredentials, scratch: Path, rounds: int
) -> dict[str, Any]:
    import asyncio  # noqa: PLC0415

    from agent.config import parse_config  # noqa: PLC0415
    from agent.link.reports import health_sample  # noqa: PLC0415
    from agent.runtime.executor import BlockingExecutor  # noqa: PLC0415
    from agent.store import Store  # noqa: PLC0415

    state_dir = scratch / "node"
    config = parse_config(
        {
            "node": {"id": node.node_id, "state_dir": str(state_dir)},
            # No heartbeats of its own during the measurement.
            "link": {"controller": controller.link_address, "cert_dir": str(state_dir / "link"),
                     "heartbeat_s": 3600.0},
        }
    )  # fmt: skip
    node.write(config.link.cert_dir)
    store = Store(config.node.store_path)
    executor = BlockingExecutor()
    service = _observed_link_service(config, store, executor)
    running = asyncio.create_task(service.run(), name="bench-link")
    enqueue: list[float] = []
    trip: list[float] = []
    bare: list[float] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not service.connected or service.channel is None:
            if running.done():
                running.result()
            if time.monotonic() > deadline:
                raise LinkError(f"the bench node did not connect: {service.last_error}")
            await asyncio.sleep(0.01)
        channel = service.channel
        for index in range(WARMUP_ROUNDS + rounds):
            start = time.perf_counter()
            seq = await service.publish(health_sample(float(index), 0, 0))
            stored = time.perf_counter()
            await service.acked_through(seq)
            acked = time.perf_counter()
            baseline = await probe(channel)
            if index >= WARMUP_ROUNDS:
                enqueue.append(stored - start)
                trip.append(acked - start)
                bare.append(baseline)
    finally:
        await cancel_and_wait(running)
        executor.shutdown()
        store.close()
    summary = {"report_round_trip": latency(trip), "baseline_unary": latency(bare)}
    return {
        "rounds": rounds,
        **summary,
        "enqueue": latency(enqueue),
        "ratio_p50": summary["report_round_trip"]["p50_ms"] / summary["baseline_unary"]["p50_ms"],
    }


# --- fan-in: lightweight link clients ---------------------------------------------------------


@dataclass
class _Samples:
    """Ack latencies keyed by when the report was sent, for every client of a run."""

    sent: int = 0
    acked: list[tuple[float, float]] = field(default_factory=list)  # (sent_at, seconds)
    errors: list[str] = field(default_factory=list)


class LightNode:
    """What a node's link puts on the wire, and nothing else: its own TLS connection (its own
    certificate), Hello, then a health report every heartbeat; acks are timed."""

    def __init__(
        self, credentials: NodeCredentials, address: str, samples: _Samples, epoch: int
    ) -> None:
        self.credentials = credentials
        self.address = address
        self.samples = samples
        self.epoch = epoch
        self.channel: Any = None
        self._call: Any = None
        self._pending: dict[int, float] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def connect(self) -> None:
        import grpc  # noqa: PLC0415

        from agent.link.channel import NODE_LINK_METHOD, client_options  # noqa: PLC0415
        from agent.link.wire import decode_downlink  # noqa: PLC0415
        from agent.proto.accelguard.v1 import link_pb2 as pb  # noqa: PLC0415

        self.channel = grpc.aio.secure_channel(
            self.address, self.credentials.channel_credentials(),
            options=client_options(KEEPALIVE_S, KEEPALIVE_S),
        )  # fmt: skip
        call = self.channel.stream_stream(NODE_LINK_METHOD)()
        hello = pb.Uplink(hello=pb.Hello(agent_version="bench", epoch=self.epoch))
        await call.write(hello.SerializeToString())
        first = await call.read()
        if first is grpc.aio.EOF or decode_downlink(first).WhichOneof("message") != "hello":
            raise LinkError(f"{self.credentials.node_id}: no HelloReply ({await call.code()})")
        self._call = call

    def beat(self, interval_s: float, phase_s: float) -> None:
        """Read acks, and send a health report every ``interval_s`` from ``phase_s`` on."""
        import asyncio  # noqa: PLC0415

        self._tasks.append(asyncio.create_task(self._read()))
        self._tasks.append(asyncio.create_task(self._beat(interval_s, phase_s)))

    async def _beat(self, interval_s: float, phase_s: float) -> None:
        import asyncio  # noqa: PLC0415

        import grpc  # noqa: PLC0415

        from agent.link.reports import health_sample  # noqa: PLC0415
        from agent.proto.accelguard.v1 import link_pb2 as pb  # noqa: PLC0415

        loop = asyncio.get_running_loop()
        due = loop.time() + phase_s
        seq = 0
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            seq += 1
            report = health_sample(seq * interval_s, 0, 0)
            report.seq = seq
            report.after_seq = seq - 1
            report.created_at = time.time()
            self._pending[seq] = time.perf_counter()
            self.samples.sent += 1
            try:
                await self._call.write(pb.Uplink(report=report).SerializeToString())
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
                self.samples.errors.append(f"{self.credentials.node_id}: send: {error!r}"[:200])
                return
            due += interval_s

    async def _read(self) -> None:
        import grpc  # noqa: PLC0415

        from agent.link.wire import decode_downlink  # noqa: PLC0415

        try:
            while (data := await self._call.read()) is not grpc.aio.EOF:
                message = decode_downlink(data)
                if message.WhichOneof("message") != "ack":
                    continue
                now = time.perf_counter()
                for seq in [s for s in self._pending if s <= message.ack.seq]:
                    sent_at = self._pending.pop(seq)
                    self.samples.acked.append((sent_at, now - sent_at))
            self.samples.errors.append(f"{self.credentials.node_id}: the stream ended")
        except grpc.aio.AioRpcError as error:
            self.samples.errors.append(f"{self.credentials.node_id}: {error.code().name}")

    async def close(self) -> None:
        import asyncio  # noqa: PLC0415

        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.channel is not None:
            await self.channel.close()


async def _fan_in(
    controller: BenchController,
    credentials: Sequence[NodeCredentials],
    sizes: Sequence[int],
    heartbeat_s: float,
    window_s: float,
    probe_channel: Any,
) -> list[dict[str, Any]]:
    import asyncio  # noqa: PLC0415
    import random  # noqa: PLC0415

    samples = _Samples()
    nodes: list[LightNode] = []
    steps: list[dict[str, Any]] = []
    rng = random.Random()  # noqa: S311 - epochs and phases, not secrets
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def connect(node: LightNode) -> None:
        async with gate:
            await node.connect()

    try:
        for size in sizes:
            address = controller.link_address
            fresh = [
                LightNode(credentials[index], address, samples, rng.getrandbits(62) + 1)
                for index in range(len(nodes), size)
            ]
            nodes.extend(fresh)
            started = time.perf_counter()
            await asyncio.gather(*(connect(node) for node in fresh))
            connect_s = time.perf_counter() - started
            for node in fresh:
                node.beat(heartbeat_s, rng.uniform(0.0, heartbeat_s))
            # Every new client has sent its first heartbeat: the load is steady from here.
            await asyncio.sleep(heartbeat_s)
            step = await _window(controller, samples, size, heartbeat_s, window_s, probe_channel)
            steps.append({"nodes": size, "connect_new_s": connect_s, **step})
    finally:
        await asyncio.gather(*(node.close() for node in nodes), return_exceptions=True)
    return steps


async def _window(
    controller: BenchController,
    samples: _Samples,
    size: int,
    heartbeat_s: float,
    window_s: float,
    probe_channel: Any,
) -> dict[str, Any]:
    import asyncio  # noqa: PLC0415

    errors_before, sent_before = len(samples.errors), samples.sent
    stop = asyncio.Event()
    baseline: list[float] = []

    async def probing() -> None:
        while not stop.is_set():
            baseline.append(await probe(probe_channel))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROBE_INTERVAL_S):
                    await stop.wait()

    prober = asyncio.create_task(probing())
    controller_cpu, client_cpu = controller.cpu_seconds(), time.process_time()
    start = time.perf_counter()
    await asyncio.sleep(window_s)
    end = time.perf_counter()
    # Counted before anything else runs: a report sent after `end` is not the window's.
    sent = samples.sent - sent_before
    controller_cpu = controller.cpu_seconds() - controller_cpu
    client_cpu = time.process_time() - client_cpu
    stop.set()
    await prober

    def in_window() -> list[float]:
        return [seconds for at, seconds in samples.acked if start <= at < end]

    # Wait for the acks of reports sent in the window: a late ack is part of the distribution.
    deadline = time.perf_counter() + ACK_GRACE_S
    while len(in_window()) < sent and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    acked = in_window()
    samples.acked.clear()  # the next step starts clean
    return {
        "heartbeat_s": heartbeat_s,
        "window_s": end - start,
        "offered_reports_per_s": size / heartbeat_s,
        "reports_sent": sent,
        "reports_acked": len(acked),
        "reports_unacked": sent - len(acked),
        "reports_per_s": len(acked) / (end - start),
        "ack": latency(acked) if acked else None,
        "ack_max_ms": max(acked) * 1000 if acked else None,
        "baseline_unary_loaded": latency(baseline) if baseline else None,
        "controller_cpu_percent": 100.0 * controller_cpu / (end - start),
        "controller_rss_bytes": controller.rss_bytes(),
        "client_cpu_percent": 100.0 * client_cpu / (end - start),
        "stream_errors": len(samples.errors) - errors_before,
    }


def _aim(steps: Sequence[dict[str, Any]], heartbeat_s: float) -> dict[str, Any]:
    target = (
        f"{AIM_NODES} connected nodes, a heartbeat each {AIM_HEARTBEAT_S:g} s, one controller "
        f"core, p99 ack < {AIM_P99_MS:g} ms"
    )
    step = next((s for s in steps if s["nodes"] == AIM_NODES), None)
    if step is None or heartbeat_s != AIM_HEARTBEAT_S:
        why = "not measured at that size and heartbeat in this run"
        return {"target": target, "met": None, "why": why}
    problems = []
    p99 = None if step["ack"] is None else step["ack"]["p99_ms"]
    if p99 is None or p99 >= AIM_P99_MS:
        problems.append(f"p99 ack {'none' if p99 is None else f'{p99:.1f} ms'}")
    if step["reports_unacked"]:
        problems.append(f"{step['reports_unacked']} reports unacked")
    if step["stream_errors"]:
        problems.append(f"{step['stream_errors']} streams failed")
    why = "; ".join(problems) if problems else f"p99 ack {p99:.1f} ms"
    return {"target": target, "met": not problems, "why": why}


# --- the benchmark ----------------------------------------------------------------------------


def _raise_fd_limit() -> int:
    import resource  # noqa: PLC0415

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard or hard == resource.RLIM_INFINITY:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def bench_link(
    fan_in: Sequence[int] = DEFAULT_FAN_IN,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    window_s: float | None = None,
    rounds: int = DEFAULT_ROUNDS,
    directory: Path | None = None,
    controller_cpu: int | None = None,
    command_rounds: int = DEFAULT_COMMAND_ROUNDS,
) -> dict[str, Any]:
    """Run the link benchmark; a JSON-ready document (see the module docstring)."""
    import asyncio  # noqa: PLC0415

    import grpc  # noqa: PLC0415

    sizes = sorted(set(fan_in))
    if not sizes or sizes[0] < 1:
        raise ValidationError("fan-in sizes must be positive node counts")
    if heartbeat_s <= 0 or rounds < 1 or (window_s is not None and window_s <= 0):
        raise ValidationError("heartbeat, window and rounds must be positive")
    window = window_s if window_s is not None else 3 * heartbeat_s
    fd_limit = _raise_fd_limit()
    if fd_limit < sizes[-1] + 256:
        raise ValidationError(
            f"{sizes[-1]} clients need about {sizes[-1] + 256} open files; the limit is "
            f"{fd_limit} (raise `ulimit -n`)"
        )
    allowed = os.sched_getaffinity(0)
    core = max(allowed) if controller_cpu is None else controller_cpu
    if core not in allowed:
        raise ValidationError(f"--cpu {core}: this process may use CPUs {sorted(allowed)}")
    client_cpus = (allowed - {core}) or allowed
    with contextlib.ExitStack() as stack:
        directory = bench_scratch(stack, directory, "agbl-")
        controller = BenchController(directory / "controller", core)
        controller.init()
        credentials = controller.provision(
            ["bench-rt", *(f"bench-{index:05d}" for index in range(sizes[-1]))]
        )
        controller.start()
        stack.callback(controller.stop)
        stack.enter_context(pinned_self(client_cpus))
        result = asyncio.run(
            _bench(controller, credentials, sizes, heartbeat_s, window, rounds, directory)
        )
        alive = controller.alive()
        code = controller.stop()
        if not alive:
            raise LinkError(f"the bench controller died (exit {code}): {controller.log_tail()}")
        # Remote commands against a real agent (agent/bench/commands.py), after the fan-in.
        from agent.bench.commands import bench_commands  # noqa: PLC0415

        result["commands"] = bench_commands(directory / "cmd", command_rounds)
    result["setup"] = {
        "cpus": sorted(allowed),
        "controller_cpu": core,
        "controller_pinning": controller.pinning,
        "client_cpus": sorted(client_cpus),
        "client_cpus_shared_with_controller": core in client_cpus,
        "fd_limit": fd_limit,
        "python": sys.version.split()[0],
        "grpc": grpc.__version__,
    }
    return result


async def _bench(
    controller: BenchController,
    credentials: Sequence[NodeCredentials],
    sizes: Sequence[int],
    heartbeat_s: float,
    window_s: float,
    rounds: int,
    directory: Path,
) -> dict[str, Any]:
    import grpc  # noqa: PLC0415

    from agent.link.channel import client_options  # noqa: PLC0415

    round_trip = await _round_trip(controller, credentials[0], directory, rounds)
    # The loaded-controller baseline dials with the round-trip node's certificate.
    probe_channel = grpc.aio.secure_channel(
        controller.link_address, credentials[0].channel_credentials(),
        options=client_options(KEEPALIVE_S, KEEPALIVE_S),
    )  # fmt: skip
    try:
        steps = await _fan_in(
            controller, credentials[1:], sizes, heartbeat_s, window_s, probe_channel
        )
    finally:
        await probe_channel.close()
    return {"benchmark": "link", "round_trip": round_trip, "fan_in": steps,
            "aim": _aim(steps, heartbeat_s)}  # fmt: skip


# --- CLI --------------------------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: node counts separated by commas") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("node counts must be positive")
    return sizes


def add_bench_parser(bench_subparsers: argparse._SubParsersAction[Any]) -> None:
    bench = bench_subparsers.add_parser(
        "link", help="report round trip against a bare gRPC call; fan-in on one controller core"
    )
    add = bench.add_argument
    add("--nodes", type=_sizes, help="fan-in sizes, comma separated (default 100,1000,2000)")
    add("--heartbeat-s", type=float, help="each client's report interval (default 10)")
    add("--window-s", type=float, help="measuring window per size (default three heartbeats)")
    add("--rounds", type=int, help="round-trip samples (default 200)")
    add("--command-rounds", type=int, help="remote command samples (default 30)")
    add("--cpu", type=int, help="the controller's core (default: the last this process may use)")
    add("--dir", type=Path, help="scratch directory (default: a temp dir)")
    add("--transport", choices=("grpc", "mqtt"), default="grpc",
        help="mqtt: the edge link's round trip beside gRPC, failover and failback "
        "(agent/bench/edge.py)")  # fmt: skip
    add("--cycles", type=int, help="mqtt: failover/failback cycles (default 3)")
    add("--fallback-after-s", type=float, help="mqtt: the node's link.fallback_after_s (5)")
    add("--failback-after-s", type=float, help="mqtt: the node's link.failback_after_s (5)")
    add(
        "--quick", action="store_true",
        help=f"small and short ({','.join(map(str, QUICK_FAN_IN))} nodes, "
        f"{QUICK_HEARTBEAT_S:g} s heartbeat): for tests, numbers not comparable",
    )  # fmt: skip


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    quick = bool(args.quick)
    if args.transport == "mqtt":
        from agent.bench import edge  # noqa: PLC0415

        switch_s = edge.QUICK_SWITCH_S if quick else None
        document = edge.bench_edge(
            rounds=args.rounds or (edge.QUICK_ROUNDS if quick else edge.DEFAULT_ROUNDS),
            cycles=args.cycles or (edge.QUICK_CYCLES if quick else edge.DEFAULT_CYCLES),
            fallback_after_s=args.fallback_after_s or switch_s or edge.DEFAULT_FALLBACK_AFTER_S,
            failback_after_s=args.failback_after_s or switch_s or edge.DEFAULT_FAILBACK_AFTER_S,
            directory=args.dir,
        )
        document["quick"] = quick
        return document
    result = bench_link(
        fan_in=args.nodes or (QUICK_FAN_IN if quick else DEFAULT_FAN_IN),
        heartbeat_s=args.heartbeat_s or (QUICK_HEARTBEAT_S if quick else DEFAULT_HEARTBEAT_S),
        window_s=args.window_s or (QUICK_WINDOW_S if quick else None),
        rounds=args.rounds or (QUICK_ROUNDS if quick else DEFAULT_ROUNDS),
        directory=args.dir,
        controller_cpu=args.cpu,
        command_rounds=args.command_rounds
        or (QUICK_COMMAND_ROUNDS if quick else DEFAULT_COMMAND_ROUNDS),
    )
    result["quick"] = quick
    return result
