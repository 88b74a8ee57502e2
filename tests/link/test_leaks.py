"""Thousands of connect/disconnect cycles against one controller process leave nothing behind.

grpc's asyncio streams have leaked on cancellation before; the controller's link handler adds
its own tasks (the acker, the reads of ``_until_done``), a session table, and commit futures.
One process here runs many lightweight clients at once (each cycle its own TCP connection and
TLS handshake, the credentials object of its node reused) through every way a stream ends:

* ``clean``: Hello, a report, its ack, half-close, status OK;
* ``cancel_after_hello`` and ``cancel_in_flight`` (eight reports written, none acked yet):
  RST_STREAM from the client;
* ``close_channel``: the client drops the whole connection with a report in flight;
* ``no_hello``: the stream opens and the connection goes before any message;
* ``garbage``: bytes that are no Uplink after Hello (refused, INVALID_ARGUMENT);
* ``reset_idle`` and ``reset_mid_message``: through a proxy that resets (RST) the TCP
  connection after Hello, or part-way through the frames of a 256 KiB report;
* ``replaced``: the same node dials again while its first stream is open (the controller
  cancels the old stream).

After a warm-up, the controller's open fds and asyncio tasks (``ControllerAdmin.GetStatus``) are
read; after the measured cycles they must come back to exactly those numbers once every stream's
handler has returned, no node may still be listed as connected, and its RSS must be within
``RSS_TOLERANCE`` of the baseline (see there for why that much, and why ``CYCLES`` is enough).
Nothing here asserts a time: the bounds on waiting only keep a hang from running forever.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.bench.link import NodeCredentials, provision_nodes
from agent.link.channel import NODE_LINK_METHOD, client_options
from agent.link.reports import health_sample
from agent.proto.accelguard.v1 import controller_pb2 as admin_pb
from agent.proto.accelguard.v1 import controller_pb2_grpc as admin_grpc
from agent.proto.accelguard.v1 import link_pb2 as pb
from tests.link.support import Controller

# 300 of each entry of ROTATION: each kind of cycle 300 times at least (see RSS_TOLERANCE).
CYCLES = 3_900
WARMUP_CYCLES = 1_000
WORKERS = 40
# Each worker takes turns with its own nodes: a session entry a stream forgot to remove is only
# visible while its node stays away, so many nodes make a forgotten one likely to show at the end.
NODES_PER_WORKER = 10
ROTATION = (
    "clean", "cancel_after_hello", "clean", "cancel_in_flight", "close_channel", "no_hello",
    "clean", "garbage", "reset_idle", "reset_mid_message", "cancel_in_flight", "replaced",
    "reset_mid_message",
)  # fmt: skip
BIG_REPORT_REASON = 4000  # characters per partition reason: 64 partitions, about 256 KiB
# Hang guards, not measurements.
CYCLE_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 60.0
STABLE_READS = 5
# RSS may end above its baseline without anything leaking: glibc keeps freed heap it cannot
# trim (fragmentation), SQLite's page cache (up to 2 MiB by default) fills as the reports table
# grows. A check over N cycles with a tolerance T proves no leak of T / N or more per cycle, so
# fewer cycles need a smaller tolerance, which the noise must allow. With glibc's default malloc
# arenas (up to 8 per core: the controller's grpc and executor threads spread over them), two
# readings 500 cycles apart differed by up to 6 MiB, and RSS ended between 1.5 MiB below and
# almost 9 MiB above its baseline over 10,000 cycles: 12 MiB was needed. The controller here
# runs with MALLOC_ARENA_MAX=1 (the `controller` fixture below), an allocator setting: a leak
# keeps as many bytes alive as before, what changes is the freed memory that RSS still counts.
# Measured on a 2-core machine, readings then differ by under 0.6 MiB, and RSS grows by 0.7 to
# 1.8 MiB over 2,600 or 3,900 cycles after the warm-up (2.3 MiB at most with three copies of
# this test at once), 3 MiB over 11,000, ever slower; tracemalloc in the controller saw its
# Python heap grow by 60 KB over 5,000 cycles, so that is C memory settling (the page cache,
# the heap's high-water mark).
# 4 MiB over 3,900 cycles is 1.05 KiB a cycle, below the 1.2 KiB of 12 MiB over 10,000: one
# object graph leaked per cycle (a handler's asyncio Task with its coroutine frame, a grpc call
# with its C-core arena and servicer context) costs several KiB and overshoots it several times
# over (an 800-byte object kept per stream, 830 bytes a cycle, made RSS grow by 5 MiB); a leak
# in one kind of cycle only (300 of them) must be 14 KiB each to show, 16 KiB before. A leaked
# task, fd or session fails the exact checks below whatever the cycle count: one is enough.
RSS_TOLERANCE = 4 << 20
# One malloc arena in the controller (see above); checked in its environment.
CONTROLLER_ENVIRONMENT = {"MALLOC_ARENA_MAX": "1"}


# --- the controller's resources ---------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    tasks: int
    fds: int
    rss: int
    sessions: int
    opened: int
    closed: int


class Watch:
    """Reads the controller's fds and RSS from /proc, its tasks through its admin socket (one
    connection, opened before the baseline and kept: it is part of both readings)."""

    def __init__(self, controller: Controller) -> None:
        assert controller.process is not None
        self.pid = controller.process.pid
        self.channel = grpc.insecure_channel(f"unix:{controller.root / 'controller.sock'}")
        self.stub = admin_grpc.ControllerAdminStub(self.channel)

    def read(self) -> Usage:
        status = self.stub.GetStatus(admin_pb.GetStatusRequest(), timeout=30)
        fds = sum(1 for _ in Path(f"/proc/{self.pid}/fd").iterdir())
        rss = 0
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        return Usage(status.asyncio_tasks, fds, rss, status.sessions, status.streams_opened,
                     status.streams_closed)  # fmt: skip

    def settled(self, target: Usage | None = None) -> Usage:
        """Once every stream's handler has returned and the task and fd counts hold still (and
        equal ``target``'s when given) for a few reads in a row; the last reading."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        history: list[Usage] = []
        while True:
            usage = self.read()
            history.append(usage)
            recent = history[-STABLE_READS:]
            quiet = usage.opened == usage.closed  # every stream's handler has returned
            steady = len(recent) == STABLE_READS and len({(u.tasks, u.fds) for u in recent}) == 1
            matches = target is None or (usage.tasks, usage.fds) == (target.tasks, target.fds)
            if quiet and steady and matches:
                return usage
            if time.monotonic() > deadline:
                return usage
            time.sleep(0.2)

    def close(self) -> None:
        self.channel.close()


# --- a proxy that resets connections, mid-message if asked ------------------------------------


@dataclass(eq=False)
class _Pair:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    up_bytes: int = 0
    limit: int | None = None


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # with SO_LINGER 0: RST, not FIN


class ResettingProxy:
    """Forwards TCP both ways in the test's loop; ``arm(n)`` resets both sides of every current
    connection once ``n`` more bytes went towards the controller, ``reset()`` at once."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.pairs: set[_Pair] = set()
        self.server: asyncio.Server | None = None
        self.port = 0
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                _reset(writer)
                return
            pair = _Pair(writer, up_writer)
            self.pairs.add(pair)
            try:
                await asyncio.gather(
                    self._pump(reader, up_writer, pair, up=True),
                    self._pump(up_reader, writer, pair, up=False),
                )
            finally:
                self.pairs.discard(pair)
                for side in (writer, up_writer):
                    side.transport.abort()
        finally:
            self._handlers.discard(task)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, pair: _Pair, *, up: bool
    ) -> None:
        with contextlib.suppress(OSError, ConnectionError, asyncio.IncompleteReadError):
            while data := await source.read(65536):
                if up and pair.limit is not None and pair.up_bytes + len(data) >= pair.limit:
                    sink.write(data[: pair.limit - pair.up_bytes])
                    with contextlib.suppress(OSError, ConnectionError):
                        await sink.drain()
                    self._reset_pair(pair)
                    return
                if up:
                    pair.up_bytes += len(data)
                sink.write(data)
                await sink.drain()
        # EOF or a reset from one side: end the other side too (FIN via abort is fine here).
        with contextlib.suppress(OSError, RuntimeError):
            if sink.can_write_eof():
                sink.write_eof()

    def _reset_pair(self, pair: _Pair) -> None:
        _reset(pair.upstream)
        _reset(pair.client)

    def arm(self, more_bytes: int) -> None:
        for pair in self.pairs:
            pair.limit = pair.up_bytes + more_bytes

    def reset(self) -> None:
        for pair in list(self.pairs):
            self._reset_pair(pair)

    async def close(self) -> None:
        self.reset()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)


# --- the clients --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    identity: NodeCredentials
    credentials: grpc.ChannelCredentials  # made once, reused by every connection of the node
    epoch: int


@dataclass
class Worker:
    """Runs its share of the cycles one after another, each as the next of its own nodes (no
    other worker dials as them), through its own proxy when a cycle needs one."""

    nodes: list[Node]
    direct: str
    proxy: ResettingProxy
    rng: random.Random
    node: Node = field(init=False)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        self.node = self.nodes[0]

    def channel(self, *, proxied: bool = False) -> Any:
        return grpc.aio.secure_channel(
            self.proxy.address if proxied else self.direct, self.node.credentials,
            options=[*client_options(10.0, 10.0),
                     # A fresh connection per channel, never one shared with another channel.
                     ("grpc.use_local_subchannel_pool", 1)],
        )  # fmt: skip

    async def hello(self, call: Any) -> int:
        hello = pb.Uplink(hello=pb.Hello(agent_version="leaks", epoch=self.node.epoch))
        await call.write(hello.SerializeToString())
        data = await call.read()
        assert data is not grpc.aio.EOF, f"no HelloReply: {await call.code()}"
        reply = pb.Downlink()
        reply.ParseFromString(data)
        assert reply.WhichOneof("message") == "hello", reply
        return int(reply.hello.resume_after)

    @staticmethod
    def report(seq: int, body: pb.Report | None = None) -> bytes:
        report = body or health_sample(1.0, 0, 0)
        report.seq = seq
        report.after_seq = seq - 1
        report.created_at = time.time()
        return pb.Uplink(report=report).SerializeToString()

    async def clean(self) -> None:
        async with self.channel() as channel:
            call = channel.stream_stream(NODE_LINK_METHOD)()
            seq = await self.hello(call) + 1
            await call.write(self.report(seq))
            while True:
                data = await call.read()
                assert data is not grpc.aio.EOF, f"no ack: {await call.code()}"
                message = pb.Downlink()
                message.ParseFromString(data)
                if message.WhichOneof("message") == "ack" and message.ack.seq >= seq:
                    break
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK

    async def cancel_after_hello(self) -> None:
        async with self.channel() as channel:
            call = channel.stream_stream(NODE_LINK_METHOD)()
            await self.hello(call)
            call.cancel()

    async def cancel_in_flight(self) -> None:
        async with self.channel() as channel:
            call = channel.stream_stream(NODE_LINK_METHOD)()
            seq = await self.hello(call)
            for offset in range(1, 9):
                await call.write(self.report(seq + offset))
            call.cancel()

    async def close_channel(self) -> None:
        channel = self.channel()
        call = channel.stream_stream(NODE_LINK_METHOD)()
        seq = await self.hello(call)
        await call.write(self.report(seq + 1))
        await channel.close()  # no grace: the connection goes with the stream open

    async def no_hello(self) -> None:
        async with self.channel() as channel:
            call = channel.stream_stream(NODE_LINK_METHOD)()
            await call.wait_for_connection()
            await asyncio.sleep(self.rng.uniform(0.0, 0.02))

    async def garbage(self) -> None:
        async with self.channel() as channel:
            call = channel.stream_stream(NODE_LINK_METHOD)()
            await self.hello(call)
            await call.write(b"\xff\xff\xff\xffnot an uplink")
            with contextlib.suppress(grpc.aio.AioRpcError):
                while await call.read() is not grpc.aio.EOF:
                    pass
            assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT

    async def reset_idle(self) -> None:
        async with self.channel(proxied=True) as channel:
            call = channel.stream_stream(NODE_LINK_METHOD)()
            await self.hello(call)
            self.proxy.reset()
            await _until_failed(call)

    async def reset_mid_message(self) -> None:
        big = pb.Report(
            inventory=pb.InventorySnapshot(
                partitions=[
                    pb.InventoryPartition(uuid=f"MIG-{index}", kind="mig", state="free",
                                          reason="x" * BIG_REPORT_REASON)
                    for index in range(64)
                ]
            )
        )  # fmt: skip
        async with self.channel(proxied=True) as channel:
            call = channel.stream_stream(NODE_LINK_METHOD)()
            seq = await self.hello(call)
            # Under the 64 KiB initial HTTP/2 window, so the bytes flow without a window update;
            # the report is about 256 KiB, so the reset lands inside it.
            self.proxy.arm(self.rng.randrange(512, 48 << 10))
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.write(self.report(seq + 1, big))
            try:
                async with asyncio.timeout(5):
                    await _until_failed(call)
            except TimeoutError:
                self.outcomes["reset_mid_message_unarmed"] += 1
                self.proxy.reset()
                await _until_failed(call)

    async def replaced(self) -> None:
        first_channel = self.channel()
        try:
            first = first_channel.stream_stream(NODE_LINK_METHOD)()
            await self.hello(first)
            async with self.channel() as second_channel:
                second = second_channel.stream_stream(NODE_LINK_METHOD)()
                await self.hello(second)
                # The controller dropped the first stream's handler when the second said Hello;
                # the old connection goes away as a half-dead one would (its status is not
                # waited for: grpc.aio sends none for a handler task cancelled by the server).
                await first_channel.close()
                await second.done_writing()
                assert await second.read() is grpc.aio.EOF
                assert await second.code() == grpc.StatusCode.OK
        finally:
            await first_channel.close()

    async def run(self, kinds: list[str], failures: list[str]) -> None:
        actions: dict[str, Callable[[], Awaitable[None]]] = {
            name: getattr(self, name) for name in set(ROTATION)
        }
        for index, kind in enumerate(kinds):
            self.node = self.nodes[index % len(self.nodes)]
            try:
                async with asyncio.timeout(CYCLE_TIMEOUT_S):
                    await actions[kind]()
                self.outcomes[kind] += 1
            except (AssertionError, grpc.aio.AioRpcError, TimeoutError, OSError) as error:
                failures.append(f"{self.node.identity.node_id} {kind}: {error!r}"[:300])


async def _until_failed(call: Any) -> None:
    """Read until the stream ends (an error status, or EOF)."""
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        while await call.read() is not grpc.aio.EOF:
            pass


async def _cycles(workers: list[Worker], count: int, offset: int) -> tuple[Any, list[str]]:
    plan = [ROTATION[(offset + index) % len(ROTATION)] for index in range(count)]
    failures: list[str] = []
    shares = [plan[index :: len(workers)] for index in range(len(workers))]
    await asyncio.gather(
        *(w.run(share, failures) for w, share in zip(workers, shares, strict=True))
    )
    return collections.Counter(plan), failures


async def _run_all(
    controller: Controller, identities: list[NodeCredentials], watch: Watch
) -> tuple[Usage, Usage, Any, collections.Counter[str], list[str]]:
    rng = random.Random(20260101)
    nodes = [Node(i, i.channel_credentials(), rng.getrandbits(62) + 1) for i in identities]
    workers = []
    for index in range(WORKERS):
        proxy = ResettingProxy(controller.link_port)
        await proxy.start()
        mine = nodes[index * NODES_PER_WORKER : (index + 1) * NODES_PER_WORKER]
        workers.append(Worker(mine, controller.link_address, proxy, random.Random(rng.random())))
    try:
        _, warmup_failures = await _cycles(workers, WARMUP_CYCLES, 0)
        assert not warmup_failures, warmup_failures[:10]
        for worker in workers:
            worker.outcomes.clear()
        baseline = await asyncio.to_thread(watch.settled)
        plan, failures = await _cycles(workers, CYCLES, WARMUP_CYCLES)
        after = await asyncio.to_thread(watch.settled, baseline)
    finally:
        await asyncio.gather(*(worker.proxy.close() for worker in workers))
    outcomes: collections.Counter[str] = collections.Counter()
    for worker in workers:
        outcomes.update(worker.outcomes)
    return baseline, after, plan, outcomes, failures


@pytest.fixture
def controller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Controller]:
    """tests/link/conftest.py's controller, started with CONTROLLER_ENVIRONMENT (it inherits
    this process's environment)."""
    for name, value in CONTROLLER_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    running = Controller(tmp_path / "controller")
    running.init()
    running.start()
    try:
        assert running.process is not None
        environment = Path(f"/proc/{running.process.pid}/environ").read_bytes().split(b"\0")
        for name, value in CONTROLLER_ENVIRONMENT.items():
            assert f"{name}={value}".encode() in environment, environment
        yield running
    finally:
        running.stop()


@pytest.mark.slow
def test_connect_disconnect_cycles_leave_no_tasks_fds_or_memory_behind(
    tmp_path: Path, controller: Controller
) -> None:
    identities = provision_nodes(
        controller.root / "pki", "test.fleet", controller.database,
        [f"leak-{index:04d}" for index in range(WORKERS * NODES_PER_WORKER)],
    )  # fmt: skip
    watch = Watch(controller)
    try:
        baseline, after, plan, outcomes, failures = asyncio.run(
            _run_all(controller, identities, watch)
        )
    finally:
        watch.close()
    report = (
        f"baseline {baseline}, after {after}, plan {dict(plan)}, outcomes {dict(outcomes)}, "
        f"rss growth {(after.rss - baseline.rss) / 1024:.0f} KiB "
        f"({(after.rss - baseline.rss) / CYCLES:.0f} bytes a cycle)"
    )
    print(report)
    assert not failures, f"{len(failures)} cycles went wrong: {failures[:10]}"
    assert sum(plan.values()) == CYCLES
    for kind, count in plan.items():
        assert outcomes[kind] == count, (kind, report)
    # Every cycle reached the handler (a stream without Hello may end before it is dispatched).
    assert after.opened - baseline.opened >= CYCLES - plan["no_hello"], report
    assert after.opened == after.closed, report
    # Every stream's handler returned, so no node may still be listed as connected.
    assert after.sessions == 0, f"{after.sessions} sessions outlived their streams: {report}"
    assert after.tasks == baseline.tasks, report
    assert after.fds == baseline.fds, report
    assert after.rss - baseline.rss <= RSS_TOLERANCE, report
    assert controller.process is not None and controller.process.poll() is None
    log = controller.log()
    for sign in ("Traceback", "never retrieved", "was destroyed but it is pending"):
        assert sign not in log, f"controller log has {sign!r}"
