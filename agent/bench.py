"""``accelguard bench ...``: benchmarks that print JSON with a baseline measured in the same run.

Ratios, not absolute times, are the result: a noisy CI machine slows both sides alike.
"""

from __future__ import annotations

import ctypes
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynvml

from agent.config import load_config
from agent.hw.nvml import NvmlBackend
from agent.layout import LayoutEngine, LayoutTarget
from agent.sim.node import init_sim_node
from agent.store import Store

SEVEN_INSTANCES = {"1g.10gb": 7}


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": statistics.median(ordered) * 1000,
        "p90_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))] * 1000,
        "mean_ms": statistics.fmean(ordered) * 1000,
    }


def _timed(rounds: int, body: Callable[[], None]) -> list[float]:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        body()
        samples.append(time.perf_counter() - start)
    return samples


def _raw_round(handle: Any, profile_id: int, ci_profile_id: int) -> None:
    """The same work as the agent's apply + teardown, as bare pynvml calls."""
    created = []
    for start in range(7):
        placement = pynvml.c_nvmlGpuInstancePlacement_t()
        placement.start = start
        placement.size = 1
        gi = pynvml.nvmlDeviceCreateGpuInstanceWithPlacement(
            handle, profile_id, ctypes.byref(placement)
        )
        ci = pynvml.nvmlGpuInstanceCreateComputeInstance(gi, ci_profile_id)
        created.append((gi, ci))
    for gi, ci in created:
        pynvml.nvmlComputeInstanceDestroy(ci)
        pynvml.nvmlGpuInstanceDestroy(gi)


def bench_layout(rounds: int, directory: Path | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="accelguard-bench-") as scratch:
        root = directory or Path(scratch)
        node = init_sim_node(root / "node", "h100x1")
        config = load_config(node.config_path)
        backend = NvmlBackend(library=config.nvml.library, sim_dir=config.nvml.sim_dir)
        backend.open()
        store = Store(config.node.store_path)
        engine = LayoutEngine(backend, store)
        apply_seven = [LayoutTarget(gpu_indices=(0,), mig_enabled=True, counts=SEVEN_INSTANCES)]
        tear_down = [LayoutTarget(gpu_indices=(0,), mig_enabled=True, counts={})]
        try:
            engine.run(tear_down, apply=True)

            def agent_round() -> None:
                engine.run(apply_seven, apply=True)
                engine.run(tear_down, apply=True)

            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            gi_info = pynvml.nvmlDeviceGetGpuInstanceProfileInfo(
                handle, pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE
            )

            def raw_round() -> None:
                _raw_round(handle, gi_info.id, 0)

            # Interleave the two so drift on a shared machine hits both alike.
            agent: list[float] = []
            raw: list[float] = []
            for _ in range(rounds):
                agent += _timed(1, agent_round)
                raw += _timed(1, raw_round)
        finally:
            store.close()
            backend.close()
    agent_summary = _summary(agent)
    raw_summary = _summary(raw)
    return {
        "benchmark": "layout",
        "layout": "7 x 1g.10gb on a simulated H100-80GB: apply then tear down",
        "rounds": rounds,
        "agent": agent_summary,
        "baseline_raw_pynvml": raw_summary,
        "ratio_p50": agent_summary["p50_ms"] / raw_summary["p50_ms"],
    }
