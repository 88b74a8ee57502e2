"""``accelguard bench ...``: benchmarks that print JSON with a baseline measured in the same run.

Ratios, not absolute times, are the result: a noisy CI machine slows both sides alike.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynvml

from agent.config import load_config
from agent.errors import ValidationError
from agent.hw.nvml import NvmlBackend
from agent.layout import LayoutEngine, LayoutTarget
from agent.sim.node import init_sim_node
from agent.store import Store

SEVEN_INSTANCES = {"1g.10gb": 7}


def _latency(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] * 1000

    return {
        "p50_ms": statistics.median(ordered) * 1000,
        "p90_ms": at(0.9),
        "p99_ms": at(0.99),
        "mean_ms": statistics.fmean(ordered) * 1000,
    }


def _seconds(body: Callable[[], Any]) -> float:
    start = time.perf_counter()
    body()
    return time.perf_counter() - start


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
                agent.append(_seconds(agent_round))
                raw.append(_seconds(raw_round))
        finally:
            store.close()
            backend.close()
    agent_summary = _latency(agent)
    raw_summary = _latency(raw)
    return {
        "benchmark": "layout",
        "layout": "7 x 1g.10gb on a simulated H100-80GB: apply then tear down",
        "rounds": rounds,
        "agent": agent_summary,
        "baseline_raw_pynvml": raw_summary,
        "ratio_p50": agent_summary["p50_ms"] / raw_summary["p50_ms"],
    }


def bench_lease(rounds: int, directory: Path | None) -> dict[str, Any]:
    """Grant and release-to-clean latency through the real agent, against a no-op admin call."""
    from agent.client import AdminClient  # noqa: PLC0415
    from agent.isolation.cgroups import hierarchy_mounts  # noqa: PLC0415
    from agent.proto.accelguard.v1 import admin_pb2 as pb  # noqa: PLC0415

    mounts = hierarchy_mounts("v2") or hierarchy_mounts("v1-devices")
    if not mounts:
        raise ValidationError("bench lease needs a cgroup v2 or v1 devices hierarchy")
    parent = mounts[0] / f"accelguard-bench-{os.getpid()}"
    tenant = parent / "tenant"
    with tempfile.TemporaryDirectory(prefix="accelguard-bench-") as scratch:
        root = directory or Path(scratch)
        parent.mkdir()
        tenant.mkdir()
        node = init_sim_node(root / "node", "h100x1", cgroup_parents=[parent], slice_bytes=1 << 20)
        config = load_config(node.config_path)
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "--config", str(node.config_path), "agent"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            with AdminClient(config.admin.socket, timeout_s=60) as client:
                _wait_for_agent(client, agent)
                client.apply_layout(
                    pb.LayoutRequest(
                        targets=[
                            pb.LayoutTarget(
                                gpu_indices=[0], mig_enabled=True, counts={"1g.10gb": 1}
                            )
                        ]
                    )
                )
                _wait_clean(client)
                grants: list[float] = []
                releases: list[float] = []
                pings: list[float] = []
                request = pb.GrantLeaseRequest(
                    tenant="bench", profile="1g.10gb", cgroup=str(tenant)
                )
                for _ in range(rounds):
                    pings.append(_seconds(client.ping))
                    start = time.perf_counter()
                    lease = client.grant_lease(request).lease.id
                    grants.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    released = client.release_lease(lease)
                    releases.append(time.perf_counter() - start)
                    if not released.clean:
                        raise ValidationError(f"release did not end clean: {released.reason}")
        finally:
            agent.terminate()
            agent.wait(timeout=30)
            tenant.rmdir()
            parent.rmdir()
    grant, release, ping = _latency(grants), _latency(releases), _latency(pings)
    return {
        "benchmark": "lease",
        "rounds": rounds,
        "grant": grant,
        "release_to_clean": release,
        "baseline_noop_admin_call": ping,
        "grant_overhead_p50_ms": grant["p50_ms"] - ping["p50_ms"],
        "ratio_grant_p50": grant["p50_ms"] / ping["p50_ms"],
        "ratio_release_p50": release["p50_ms"] / ping["p50_ms"],
        "aim": "grant p50 within 10 ms of the no-op call",
    }


def _wait_for_agent(client: Any, agent: subprocess.Popen[bytes]) -> None:
    from agent.errors import AccelguardError  # noqa: PLC0415

    for _ in range(600):
        if agent.poll() is not None:
            raise ValidationError(f"the agent exited with {agent.returncode}")
        try:
            client.ping()
        except AccelguardError:
            time.sleep(0.05)
        else:
            return
    raise ValidationError("the agent did not start within 30 s")


def _wait_clean(client: Any) -> None:
    for _ in range(600):
        partitions = client.list_partitions().partitions
        if partitions and all(p.state == "free" and p.clean for p in partitions):
            return
        time.sleep(0.05)
    raise ValidationError("partitions did not become clean within 30 s")


def bench_scrub(rounds: int, directory: Path | None, size_mib: int = 256) -> dict[str, Any]:
    """Scrub write and verify bandwidth beside the device's own memset on the same memory.

    On a GPU node: the CUDA worker's kernels against ``cuMemsetD32`` on one allocation. On the
    simulated node: the simulated-memory scrubber against ``memset`` on a mapping of the same file.
    """
    if Path("/proc/driver/nvidia/version").exists():
        from agent.scrub.cuda import benchmark_cuda  # noqa: PLC0415

        return {"benchmark": "scrub", "backend": "cuda", **benchmark_cuda(rounds=rounds)}
    import mmap  # noqa: PLC0415

    from agent.scrub.base import ScrubTarget  # noqa: PLC0415
    from agent.scrub.simmem import SimMemoryScrubBackend  # noqa: PLC0415

    size = size_mib << 20
    memset: list[float] = []
    writes: list[float] = []
    verifies: list[float] = []
    with tempfile.TemporaryDirectory(prefix="accelguard-bench-", dir=directory) as scratch:
        path = Path(scratch) / "gpu.mem"
        with path.open("wb") as empty:
            empty.truncate(size)
        target = ScrubTarget(
            partition_uuid="bench", gpu_uuid="bench", gpu_index=0, kind="gpu",
            visible_device="", total_bytes=size, memory_file=str(path), offset=0,
        )  # fmt: skip
        backend = SimMemoryScrubBackend()
        with path.open("r+b") as handle, mmap.mmap(handle.fileno(), size) as view:
            address = ctypes.addressof(ctypes.c_char.from_buffer(view))
            try:
                for _ in range(rounds):
                    start = time.perf_counter()
                    ctypes.memset(address, 0, size)
                    memset.append(time.perf_counter() - start)
                    [result] = backend.scrub(target, (0,))
                    writes.append(result.write_seconds)
                    verifies.append(result.verify_seconds)
            finally:
                del address  # the mapping cannot close while a ctypes view exports it

    def rate(samples: list[float]) -> float:
        return size / statistics.median(samples)

    baseline, write, verify = rate(memset), rate(writes), rate(verifies)
    return {
        "benchmark": "scrub",
        "backend": "simmem",
        "bytes": size,
        "rounds": rounds,
        "baseline_memset_bytes_per_s": baseline,
        "write_bytes_per_s": write,
        "verify_bytes_per_s": verify,
        "ratio_write": write / baseline,
        "ratio_verify": verify / baseline,
    }
