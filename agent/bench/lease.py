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


# A busy node: training jobs, data loaders and exporters hold 10^5-10^6 descriptors.
BUSY_NODE_DESCRIPTORS = 200_000
_DESCRIPTORS_PER_HOLDER = 50_000
_DESCRIPTOR_HOLDER = """
import os, resource, signal, sys
wanted = int(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
try:
    limit = hard if hard == resource.RLIM_INFINITY else max(hard, wanted + 64)
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted + 64, limit))
except (ValueError, OSError):
    # Raising the hard limit needs CAP_SYS_RESOURCE: take what the hard limit allows.
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    wanted = max(0, min(wanted, hard - 64))
if wanted:
    null = os.open("/dev/null", os.O_RDONLY)
    for _ in range(wanted - 1):
        os.dup(null)
print(wanted, flush=True)
signal.pause()
"""


def bench_lease(
    rounds: int, directory: Path | None, busy_descriptors: int = BUSY_NODE_DESCRIPTORS
) -> dict[str, Any]:
    """Grant and release-to-clean latency through the real agent, against a no-op admin call.

    Then release again on a busy node (``busy_descriptors`` open in other processes: every release
    reads them all, see agent/evict.py) while another client pings the agent, which must keep
    answering while a release's scan runs.
    """
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
                busy_releases: list[float] = []
                busy_pings: list[float] = []
                helpers = _descriptor_holders(busy_descriptors)
                try:
                    for _ in range(rounds):
                        lease = client.grant_lease(request).lease.id
                        elapsed, samples = _release_while_pinging(
                            client, config.admin.socket, lease
                        )
                        busy_releases.append(elapsed)
                        busy_pings += samples
                finally:
                    opened = _stop_descriptor_holders(helpers)
        finally:
            agent.terminate()
            agent.wait(timeout=30)
            tenant.rmdir()
            parent.rmdir()
    grant, release, ping = _latency(grants), _latency(releases), _latency(pings)
    busy, busy_ping = _latency(busy_releases), _latency(busy_pings)
    return {
        "benchmark": "lease",
        "rounds": rounds,
        "grant": grant,
        "release_to_clean": release,
        "baseline_noop_admin_call": ping,
        "grant_overhead_p50_ms": grant["p50_ms"] - ping["p50_ms"],
        "ratio_grant_p50": grant["p50_ms"] / ping["p50_ms"],
        "ratio_release_p50": release["p50_ms"] / ping["p50_ms"],
        "busy_node_descriptors": opened,
        "busy_node_holder_processes": len(helpers),
        "release_to_clean_busy_node": busy,
        "scan_overhead_p50_ms": busy["p50_ms"] - release["p50_ms"],
        "ratio_release_busy_p50": busy["p50_ms"] / release["p50_ms"],
        "ping_during_busy_release": busy_ping,
        "ratio_ping_busy_p99": busy_ping["p99_ms"] / ping["p99_ms"],
        "aim": "grant p50 within 10 ms of the no-op call",
        "aim_busy_node": (
            f"{busy_descriptors} descriptors add < 50 ms to release (p50); "
            "Ping answers within 20 ms (p99) while a release scans them"
        ),
    }


def _descriptor_holders(total: int) -> list[tuple[subprocess.Popen[str], int]]:
    """Processes that hold ``total`` descriptors (on /dev/null) between them, until stopped."""
    helpers: list[tuple[subprocess.Popen[str], int]] = []
    opened = 0
    complete = False
    try:
        while opened < total:
            helper = subprocess.Popen(
                [sys.executable, "-c", _DESCRIPTOR_HOLDER,
                 str(min(total - opened, _DESCRIPTORS_PER_HOLDER))],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            count = helper.stdout.readline().strip() if helper.stdout is not None else ""
            helpers.append((helper, int(count) if count.isdigit() else 0))
            if not helpers[-1][1]:
                break
            opened += helpers[-1][1]
        complete = opened >= total
    finally:
        if not complete:
            _stop_descriptor_holders(helpers)
    if not complete:
        raise ValidationError(
            "a helper could not open descriptors (is the RLIMIT_NOFILE hard limit below 128?)"
        )
    return helpers


def _stop_descriptor_holders(helpers: list[tuple[subprocess.Popen[str], int]]) -> int:
    for helper, _ in helpers:
        helper.kill()
    for helper, _ in helpers:
        helper.wait(timeout=30)
        if helper.stdout is not None:
            helper.stdout.close()
    return sum(count for _, count in helpers)


def _release_while_pinging(client: Any, socket: Path, lease: str) -> tuple[float, list[float]]:
    """Release ``lease`` while a second client pings the agent; (release seconds, ping seconds)."""
    import threading  # noqa: PLC0415

    from agent.client import AdminClient  # noqa: PLC0415

    samples: list[float] = []
    ready = threading.Event()
    done = threading.Event()

    def ping() -> None:
        with AdminClient(socket, timeout_s=60) as pinger:
            pinger.ping()  # connects the channel: not part of what is measured
            ready.set()
            while True:
                samples.append(_seconds(pinger.ping))
                # About 200 pings a second: an operator's CLI, a watchdog, not a flood.
                if done.wait(0.005):
                    return

    pinger = threading.Thread(target=ping, name="bench-ping")
    pinger.start()
    try:
        ready.wait(timeout=60)
        start = time.perf_counter()
        released = client.release_lease(lease)
        elapsed = time.perf_counter() - start
    finally:
        done.set()
        pinger.join()
    if not released.clean:
        raise ValidationError(f"release on the busy node did not end clean: {released.reason}")
    return elapsed, samples


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
    """Scrub write and verify bandwidth beside a baseline measured on the same memory.

    On a GPU node: the scrub's write (``cuMemsetD32``) and verify kernel against a device-to-device
    copy (``cuMemcpyDtoD``) of the same chunks; the result names each ratio's baseline. On the
    simulated node: the simulated-memory scrubber against ``memset`` on a mapping of the same file.
    """
    if Path("/proc/driver/nvidia/version").exists():
        from agent.scrub.cuda.benchmark import benchmark_cuda  # noqa: PLC0415

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
