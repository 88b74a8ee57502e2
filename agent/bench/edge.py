"""``accelguard bench link --transport mqtt``: the edge link (docs/edge.md) in one JSON document.

* **Round trip over MQTT beside gRPC**: two nodes run the real link service (each its own SQLite
  outbox) against one controller process with its MQTT bridge and a real mosquitto configured
  from docs/edge/. One dials the controller's gRPC port; the other is an edge node whose gRPC
  address leads nowhere, so it falls back to MQTT at once. A report's round trip is from
  ``publish`` (stored and fsynced in the outbox) to the node having stored the ack. The two
  alternate report by report; the gRPC round trip is the same-run baseline (``ratio_p50``).
* **Failover and failback**: an edge node reports every 100 ms with its gRPC through a TCP proxy
  in this process. ``failover_s``: from the proxy cutting gRPC (resetting its connections and
  refusing new ones) to the first report acked over MQTT; aim ``fallback_after_s + 2 s``.
  ``failback_s``: from the proxy letting gRPC through again to the first report acked over gRPC;
  aim ``failback_after_s + 2 s``. Repeated ``--cycles`` times.

The node identities are minted with the controller CA and recorded as enrolled, as for the gRPC
link bench (agent/bench/link.py). mosquitto comes from Debian's package.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from agent.bench.common import bench_scratch, latency
from agent.bench.link import (
    START_TIMEOUT_S,
    TRUST_DOMAIN,
    BenchController,
    NodeCredentials,
    _observed_link_service,
)
from agent.errors import LinkError, ValidationError
from agent.runtime.net import pipe
from agent.runtime.tasks import cancel_and_wait

if TYPE_CHECKING:
    import asyncio

DEFAULT_ROUNDS: Final = 200
QUICK_ROUNDS: Final = 20
WARMUP_ROUNDS: Final = 10
DEFAULT_CYCLES: Final = 3
QUICK_CYCLES: Final = 1
REPORT_EVERY_S: Final = 0.1
DEFAULT_FALLBACK_AFTER_S: Final = 5.0
DEFAULT_FAILBACK_AFTER_S: Final = 5.0
QUICK_SWITCH_S: Final = 1.0
# The aim: the first report over the new transport within the configured delay plus this.
AIM_SLACK_S: Final = 2.0


class CutProxy:
    """A TCP proxy on 127.0.0.1 in this event loop that can cut its traffic: reset every
    connection and refuse new ones, until let through again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cut = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        import asyncio  # noqa: PLC0415

        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio  # noqa: PLC0415

        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        if self.cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}
            up_writer.transport.abort()
            writer.transport.abort()

    def block(self) -> None:
        self.cut = True
        for writer in list(self._writers):
            writer.transport.abort()

    def unblock(self) -> None:
        self.cut = False

    async def close(self) -> None:
        import asyncio  # noqa: PLC0415

        self.block()
        # The aborted connections end their handlers; none may be left for the loop to cancel.
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def _node(
    credentials: NodeCredentials, scratch: Path, link: dict[str, Any], profile: str
) -> tuple[Any, asyncio.Task[None], Any, Any]:
    """A node's link service as the daemon runs it (ack notices for the bench)."""
    import asyncio  # noqa: PLC0415

    from agent.config import parse_config  # noqa: PLC0415
    from agent.runtime.executor import BlockingExecutor  # noqa: PLC0415
    from agent.store import Store  # noqa: PLC0415

    state_dir = scratch / credentials.node_id
    config = parse_config(
        {
            "node": {"id": credentials.node_id, "state_dir": str(state_dir), "profile": profile},
            "link": {"cert_dir": str(state_dir / "link"), "heartbeat_s": 3600.0,
                     "backoff_base_s": 0.05, "backoff_cap_s": 0.5, **link},
        }
    )  # fmt: skip
    credentials.write(config.link.cert_dir)
    store = Store(config.node.store_path)
    executor = BlockingExecutor()
    service = _observed_link_service(config, store, executor)
    task = asyncio.create_task(service.run(), name=f"bench-{credentials.node_id}")
    return service, task, store, executor


async def _stop(task: asyncio.Task[None], store: Any, executor: Any) -> None:
    await cancel_and_wait(task)
    executor.shutdown()
    store.close()


async def _until(condition: Any, what: str, task: asyncio.Task[None], timeout: float) -> None:
    import asyncio  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    while not condition():
        if task.done():
            task.result()
        if time.monotonic() > deadline:
            raise LinkError(f"bench: timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def _round_trips(
    controller: BenchController, broker: str, nodes: list[NodeCredentials], scratch: Path,
    rounds: int,
) -> dict[str, Any]:  # fmt: skip
    from agent.link.reports import health_sample  # noqa: PLC0415

    grpc_node = await _node(
        nodes[0], scratch, {"controller": controller.link_address}, "datacenter"
    )
    mqtt_node = await _node(
        nodes[1], scratch,
        # Nothing listens on port 9: gRPC fails at once and the node falls back.
        {"controller": "127.0.0.1:9", "mqtt_broker": broker, "fallback_after_s": 0.01},
        "edge",
    )  # fmt: skip
    samples: dict[str, list[float]] = {"grpc": [], "mqtt": []}
    try:
        for (service, task, _, _), transport in ((grpc_node, "grpc"), (mqtt_node, "mqtt")):
            await _until(lambda s=service, t=transport: s.connected and s.transport == t,
                         f"the {transport} node to connect", task, START_TIMEOUT_S)  # fmt: skip
        for index in range(WARMUP_ROUNDS + rounds):
            for (service, _, _, _), transport in ((grpc_node, "grpc"), (mqtt_node, "mqtt")):
                start = time.perf_counter()
                seq = await service.publish(health_sample(float(index), 0, 0))
                await service.acked_through(seq)
                if index >= WARMUP_ROUNDS:
                    samples[transport].append(time.perf_counter() - start)
    finally:
        for _, task, store, executor in (grpc_node, mqtt_node):
            await _stop(task, store, executor)
    mqtt, grpc_ = latency(samples["mqtt"]), latency(samples["grpc"])
    return {"rounds": rounds, "mqtt": mqtt, "grpc_baseline": grpc_,
            "ratio_p50": mqtt["p50_ms"] / grpc_["p50_ms"]}  # fmt: skip


async def _switches(
    controller: BenchController, broker: str, node: NodeCredentials, scratch: Path,
    cycles: int, fallback_after_s: float, failback_after_s: float,
) -> dict[str, Any]:  # fmt: skip
    import asyncio  # noqa: PLC0415

    from agent.link.reports import health_sample  # noqa: PLC0415

    proxy = CutProxy(controller.link_port)
    await proxy.start()
    service, task, store, executor = await _node(
        node, scratch,
        {"controller": proxy.address, "mqtt_broker": broker, "fallback_after_s": fallback_after_s,
         "failback_after_s": failback_after_s, "keepalive_time_s": 1.0,
         "keepalive_timeout_s": 1.0},
        "edge",
    )  # fmt: skip
    first_ack: dict[str, float] = {}

    async def report_every_100ms() -> None:
        index = 0
        while True:
            index += 1
            seq = await service.publish(health_sample(float(index), 0, 0))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REPORT_EVERY_S):
                    transport = service.transport
                    await service.acked_through(seq)
                    if service.connected and transport == service.transport:
                        first_ack.setdefault(transport, time.monotonic())
            await asyncio.sleep(REPORT_EVERY_S)

    reporter = asyncio.create_task(report_every_100ms())
    failover: list[float] = []
    failback: list[float] = []
    try:
        await _until(lambda: service.connected and service.transport == "grpc",
                     "the edge node on gRPC", task, START_TIMEOUT_S)  # fmt: skip

        async def switch(action: Any, transport: str, delay_s: float) -> float:
            """Seconds from ``action`` to the first report acked over ``transport``."""
            first_ack.clear()
            started = time.monotonic()
            action()
            await _until(lambda: transport in first_ack, f"a report acked over {transport}",
                         task, delay_s + START_TIMEOUT_S)  # fmt: skip
            return first_ack[transport] - started

        for _ in range(cycles):
            failover.append(await switch(proxy.block, "mqtt", fallback_after_s))
            failback.append(await switch(proxy.unblock, "grpc", failback_after_s))
    finally:
        await cancel_and_wait(reporter)
        await _stop(task, store, executor)
        await proxy.close()
    over, back = statistics.median(failover), statistics.median(failback)
    return {
        "cycles": cycles,
        "report_every_s": REPORT_EVERY_S,
        "fallback_after_s": fallback_after_s,
        "failback_after_s": failback_after_s,
        "failover_s": {"median": over, "max": max(failover), "all": failover},
        "failback_s": {"median": back, "max": max(failback), "all": failback},
        "aim": {
            "failover_within_s": fallback_after_s + AIM_SLACK_S,
            "failback_within_s": failback_after_s + AIM_SLACK_S,
            "met": max(failover) <= fallback_after_s + AIM_SLACK_S
            and max(failback) <= failback_after_s + AIM_SLACK_S,
        },
    }


def bench_edge(
    rounds: int = DEFAULT_ROUNDS,
    cycles: int = DEFAULT_CYCLES,
    fallback_after_s: float = DEFAULT_FALLBACK_AFTER_S,
    failback_after_s: float = DEFAULT_FAILBACK_AFTER_S,
    directory: Path | None = None,
) -> dict[str, Any]:
    import asyncio  # noqa: PLC0415

    from agent.bench.broker import Broker  # noqa: PLC0415

    if rounds < 1 or cycles < 1 or fallback_after_s <= 0 or failback_after_s <= 0:
        raise ValidationError("rounds, cycles and the switch delays must be positive")
    with contextlib.ExitStack() as stack:
        directory = bench_scratch(stack, directory, "agbe-")
        controller = BenchController(directory / "controller", None)
        controller.init()
        nodes = controller.provision(["edge-grpc", "edge-mqtt", "edge-switch"])
        broker = Broker(controller.pki_dir, TRUST_DOMAIN)
        stack.callback(broker.remove)
        broker.prepare()
        broker.start()
        controller.configure(mqtt_broker=broker.address)
        controller.start()
        stack.callback(controller.stop)

        async def run() -> dict[str, Any]:
            trips = await _round_trips(controller, broker.address, nodes[:2], directory, rounds)
            switches = await _switches(controller, broker.address, nodes[2], directory, cycles,
                                       fallback_after_s, failback_after_s)  # fmt: skip
            return {"round_trip": trips, "switch": switches}

        result = asyncio.run(run())
        if not controller.alive():
            raise LinkError(f"the bench controller died: {controller.log_tail()}")
    return {"benchmark": "link", "transport": "mqtt", **result}
