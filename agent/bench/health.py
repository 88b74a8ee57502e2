"""``accelguard bench health``: what the GPU health monitor costs, and how fast it acts.

* **Idle cost**: the agent on an idle simulated 8-GPU node, once with ``[health] enabled =
  false`` (the baseline, measured in the same run) and once with the monitor; CPU seconds of the
  agent process per second of wall time over the same window. Aim: the monitor adds at most
  0.5% of one core. The simulated NVML polls its event file while a wait is pending, so the
  number includes that simulator cost (real NVML blocks in the driver).
* **Reaction**: an XID NVML attributes to one MIG instance (154: instance scope) injected
  through nvml-sim's control file, to that partition quarantined in the journal (p50/p99 over
  the rounds); the partition is cleared (scrubbed) between rounds, untimed.
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from agent.bench.common import cpu_seconds, latency, start_agent, wait_all_clean, wait_for_agent
from agent.errors import AccelguardError, ValidationError
from agent.runtime.process import stop_process

AIM_CPU_PERCENT: Final = 0.5
DEFAULT_WINDOW_S: Final = 20.0
DEFAULT_ROUNDS: Final = 20
QUICK_WINDOW_S: Final = 2.0
QUICK_ROUNDS: Final = 3
SETTLE_S: Final = 2.0
XID: Final = 154


class _Agent:
    def __init__(self, config_path: Path, log: Path) -> None:
        self.config_path = config_path
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from agent.admin.client import AdminClient  # noqa: PLC0415
        from agent.config import load_config  # noqa: PLC0415

        self.process = start_agent(self.config_path, self.log)
        with AdminClient(load_config(self.config_path).admin.socket, timeout_s=2) as client:
            wait_for_agent(client, self.process)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def cpu_per_second(self, window_s: float) -> float:
        if self.process is None:
            raise AccelguardError("bench health: the agent is not running")
        time.sleep(SETTLE_S)
        pid = self.process.pid
        cpu, wall = cpu_seconds(pid), time.monotonic()
        time.sleep(window_s)
        return (cpu_seconds(pid) - cpu) / (time.monotonic() - wall)


def _configure(config_path: Path, *, health: bool) -> None:
    from agent.config import config_as_dict, load_config, parse_config, to_toml  # noqa: PLC0415

    document = config_as_dict(load_config(config_path))
    document["health"]["enabled"] = health
    config_path.write_text(to_toml(parse_config(document)))


def bench_health(window_s: float, rounds: int, directory: Path) -> dict[str, Any]:
    from agent.admin.client import AdminClient  # noqa: PLC0415
    from agent.config import load_config  # noqa: PLC0415
    from agent.proto.accelguard.v1 import admin_pb2  # noqa: PLC0415
    from agent.sim.inject import inject_xid  # noqa: PLC0415
    from agent.sim.node import init_sim_node  # noqa: PLC0415

    if window_s <= 0 or rounds < 1:
        raise ValidationError("window and rounds must be positive")
    node = init_sim_node(directory / "node", "h100x8", slice_bytes=1 << 20)
    agent = _Agent(node.config_path, directory / "agent.log")
    config = load_config(node.config_path)
    idle: dict[str, float] = {}
    try:
        for name, enabled in (("without_monitor", False), ("with_monitor", True)):
            _configure(node.config_path, health=enabled)
            agent.start()
            idle[name] = agent.cpu_per_second(window_s)
            if enabled:
                break  # keep it running for the reaction rounds
            agent.stop()
        with AdminClient(config.admin.socket) as client:
            request = admin_pb2.LayoutRequest(
                targets=[admin_pb2.LayoutTarget(gpu_indices=[0], mig_enabled=True,
                                                counts={"1g.10gb": 1})]
            )  # fmt: skip
            client.apply_layout(request)
            status = client.status()
            gpu0 = next(g for g in status.gpus if g.index == 0)
            instance = gpu0.instances[0]
            wait_all_clean(client)
            samples = []
            for _ in range(rounds):
                started = time.perf_counter()
                inject_xid(
                    config.nvml.sim_dir, 0, XID, instance.gpu_instance_id,
                    instance.compute_instance_id,
                )  # fmt: skip
                _wait_state(config.node.store_path, instance.uuid, "quarantined")
                samples.append(time.perf_counter() - started)
                client.clear(instance.uuid, "bench: next round")
                wait_all_clean(client)
    finally:
        agent.stop()
    extra = (idle["with_monitor"] - idle["without_monitor"]) * 100
    return {
        "benchmark": "health",
        "gpus": 8,
        "idle_cpu_percent": {
            "without_monitor": idle["without_monitor"] * 100,
            "with_monitor": idle["with_monitor"] * 100,
            "monitor_extra": extra,
            "window_s": window_s,
        },
        "xid_to_quarantine": {**latency(samples), "rounds": rounds, "xid": XID},
        "aim": {
            "monitor_extra_cpu_percent_at_most": AIM_CPU_PERCENT,
            "met": extra <= AIM_CPU_PERCENT,
        },
        "note": "baseline: the same agent on the same node with [health] enabled = false",
    }


def _wait_state(store: Path, uuid: str, state: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)) as db:
        while time.monotonic() < deadline:
            row = db.execute("SELECT state FROM partitions WHERE uuid = ?", (uuid,)).fetchone()
            if row is not None and row[0] == state:
                return
            time.sleep(0.001)
    raise AccelguardError(f"bench health: {uuid} not {state} after {timeout:.0f} s")


def add_bench_parser(bench_subparsers: argparse._SubParsersAction[Any]) -> None:
    bench = bench_subparsers.add_parser(
        "health", help="the health monitor's idle CPU cost and XID-to-quarantine latency"
    )
    bench.add_argument("--window-s", type=float, help="idle measuring window (default 20)")
    bench.add_argument("--rounds", type=int, help="XID injections (default 20)")
    bench.add_argument("--quick", action="store_true", help="short: for tests")


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    quick = bool(args.quick)
    with tempfile.TemporaryDirectory(prefix="agbh-") as scratch:
        result = bench_health(
            args.window_s or (QUICK_WINDOW_S if quick else DEFAULT_WINDOW_S),
            args.rounds or (QUICK_ROUNDS if quick else DEFAULT_ROUNDS),
            Path(scratch),
        )
    result["quick"] = quick
    return result
