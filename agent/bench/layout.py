"""``accelguard bench layout``: apply and tear down a 7-instance layout through the agent's layout
engine, beside the same GPU-instance and compute-instance calls made as bare pynvml, on a
simulated H100."""

from __future__ import annotations

import ctypes
import tempfile
from pathlib import Path
from typing import Any

import pynvml

from agent.bench.common import interleaved, latency
from agent.config import load_config
from agent.hw.nvml import NvmlBackend
from agent.partitions.layout import LayoutEngine, LayoutTarget
from agent.sim.node import init_sim_node
from agent.store import Store

SEVEN_INSTANCES = {"1g.10gb": 7}


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
        tear_down = [LayoutTarget(gpu_indices=(0,), mig_enabled=True, counts={}, clear=True)]
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

            agent, raw = interleaved(rounds, agent_round, raw_round)
        finally:
            store.close()
            backend.close()
    agent_summary = latency(agent)
    raw_summary = latency(raw)
    return {
        "benchmark": "layout",
        "layout": "7 x 1g.10gb on a simulated H100-80GB: apply then tear down",
        "rounds": rounds,
        "agent": agent_summary,
        "baseline_raw_pynvml": raw_summary,
        "ratio_p50": agent_summary["p50_ms"] / raw_summary["p50_ms"],
    }
