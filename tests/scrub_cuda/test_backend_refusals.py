"""What CudaScrubBackend does where it must not scrub: wrong device named, no driver, bad input.

The backend runs in a worker process whose environment names the partition, so these tests run
it the same way: in a child process with CUDA_VISIBLE_DEVICES set. Every failure must arrive as
ScrubError with a message that says what to fix, never as OSError or AttributeError. (The GPU
paths themselves are in hwtests/test_cuda_scrub.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import ScrubError
from agent.scrub.cuda.backend import CudaScrubBackend, CudaScrubReport
from agent.scrub.cuda.benchmark import benchmark_cuda
from agent.scrub.cuda.driver import CudaDriver
from agent.scrub.cuda.passes import SharedMemoryReport

REPO = Path(__file__).resolve().parents[2]
MIG = "MIG-0e1d2c3b-4a59-6877-8695-a4b3c2d1e0f9"

_WORKER = """
import json, sys
from agent.errors import AccelguardError
from agent.scrub.model import ScrubTarget
from agent.scrub.cuda.backend import CudaScrubBackend
target = ScrubTarget.from_dict(json.loads(sys.argv[1]))
backend = CudaScrubBackend(library=sys.argv[2])
try:
    backend.scrub(target, tuple(json.loads(sys.argv[3])))
except AccelguardError as error:
    print(json.dumps({"error": type(error).__name__, "message": str(error)}))
else:
    print(json.dumps({"error": None}))
"""


def run_worker(visible: str | None, library: str, patterns: list[int]) -> dict[str, str]:
    target = {
        "partition_uuid": "p-1",
        "gpu_uuid": "GPU-5a7b3c1d-2e4f-6a8b-9c0d-1e2f3a4b5c6d",
        "gpu_index": 0,
        "kind": "mig",
        "visible_device": MIG,
        "total_bytes": 10 << 30,
    }
    environment = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if visible is not None:
        environment["CUDA_VISIBLE_DEVICES"] = visible
    completed = subprocess.run(
        [sys.executable, "-c", _WORKER, json.dumps(target), library, json.dumps(patterns)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=environment,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result: dict[str, str] = json.loads(completed.stdout)
    return result


@pytest.mark.parametrize("visible", [None, "", "0", "GPU-5a7b3c1d-2e4f-6a8b-9c0d-1e2f3a4b5c6d"])
def test_refuses_unless_the_environment_names_the_partition(visible: str | None) -> None:
    # The library path does not exist: the refusal comes before CUDA is touched at all.
    result = run_worker(visible, "/nonexistent/libcuda.so.1", [0])
    assert result["error"] == "ScrubError"
    assert "CUDA_VISIBLE_DEVICES is" in result["message"]
    assert MIG in result["message"]


def test_missing_driver_is_a_scrub_error() -> None:
    result = run_worker(MIG, "/nonexistent/libcuda.so.1", [0])
    assert result["error"] == "ScrubError"
    assert "cannot load the CUDA driver library" in result["message"]


@pytest.mark.parametrize("patterns", [[], [-1], [1 << 32]])
def test_bad_patterns_are_refused(patterns: list[int]) -> None:
    result = run_worker(MIG, "/nonexistent/libcuda.so.1", patterns)
    assert result["error"] == "ScrubError"
    assert "pattern" in result["message"]


def test_library_without_the_driver_api_is_a_scrub_error() -> None:
    driver = CudaDriver("libc.so.6")  # a real library that is not libcuda
    with pytest.raises(ScrubError, match="does not export cuInit"):
        driver.init()


def test_benchmark_needs_at_least_one_round() -> None:
    with pytest.raises(ScrubError, match="rounds"):
        benchmark_cuda(rounds=0)


def test_detail_is_empty_before_a_scrub() -> None:
    assert CudaScrubBackend().detail == ""
    assert CudaScrubBackend.name == "cuda"


def _report(shared: SharedMemoryReport | None) -> CudaScrubReport:
    return CudaScrubReport(
        device_name="NVIDIA H100 80GB HBM3",
        device_uuid="0e1d2c3b-4a59-6877-8695-a4b3c2d1e0f9",
        driver_version=12080,
        memory_free_bytes=10_200_000_000,
        memory_total_bytes=10_468_982_784,
        allocated_bytes=10_301_210_624,
        chunk_count=6,
        smallest_chunk_bytes=2 << 20,
        first_mismatches={0: (3, 1024)},
        shared_memory=shared,
    )


def test_report_states_the_unverified_remainder_and_mismatches() -> None:
    text = _report(None).describe(10_468_982_784)
    assert "allocated 10301210624 of 10468982784 B in 6 chunks" in text
    assert "167772160 B not allocatable" in text
    assert "pattern 0x00000000: first mismatch in chunk 3 at word 1024" in text
    assert "shared memory" not in text


@pytest.mark.parametrize(
    ("reached", "mismatched", "clean"), [(16, 0, True), (15, 0, False), (16, 3, False)]
)
def test_shared_memory_is_clean_only_on_every_sm_with_no_mismatch(
    reached: int, mismatched: int, clean: bool
) -> None:
    shared = SharedMemoryReport(
        bytes_per_block=232448,
        shared_bytes_per_sm=233472,
        sm_count=16,
        sms_reached=reached,
        blocks_run=32,
        bytes_cleared=32 * 232448,
        mismatched_words=mismatched,
        seconds=0.0001,
    )
    assert shared.clean is clean
    assert f"on {reached} of 16 SMs" in _report(shared).describe(10_468_982_784)
