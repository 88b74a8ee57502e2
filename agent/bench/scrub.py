"""``accelguard bench scrub``: scrub bandwidth beside a baseline measured on the same memory."""

from __future__ import annotations

import ctypes
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.bench.common import bytes_per_second


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

    from agent.scrub.model import ScrubTarget  # noqa: PLC0415
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
            visible_device="", total_bytes=size, memory_file=str(path), ranges=((0, size),),
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

    baseline = bytes_per_second(size, memset)
    write = bytes_per_second(size, writes)
    verify = bytes_per_second(size, verifies)
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
