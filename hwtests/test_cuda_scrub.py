"""The CUDA scrub on a real GPU: plant a word, scrub, look for it; coverage; the benchmark.

Read-only towards the GPU's configuration: no MIG change, no reset, no clock or ECC setting; the
only thing written is device memory these processes allocate. Each step runs in its own process
with CUDA_VISIBLE_DEVICES naming the partition, as the daemon's scrub worker does (running this
file as a script is that child: ``python hwtests/test_cuda_scrub.py MODE ...``).

Limits of "the planted word is gone" (best effort, recorded in scrub-record.json):
- a new process sees only memory the driver will allocate to it; memory the driver keeps (its
  contexts, page tables, our module) is neither scrubbed nor readable, and pages the scrub
  worker's own context used may come back to the checking process unscrubbed. So the check
  allows at most the unscrubbed remainder (total minus what the scrub allocated) to still hold
  the word, and records how much did.
- if the driver already clears memory between processes, the control run (plant, then look
  without scrubbing) finds nothing and the check would prove nothing about the scrub: then
  (or whenever the control finds no more than the check tolerates) the residue test is skipped
  as "residue not demonstrated", never passed, and the record says which case this machine is.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.hw.nvml import NvmlBackend
from agent.scrub.cuda.backend import CudaScrubBackend
from agent.scrub.cuda.benchmark import benchmark_cuda
from agent.scrub.cuda.diagnostics import fill_free_memory, survey_free_memory
from agent.scrub.model import POLICY_PATTERNS, ScrubResult, ScrubTarget
from hwtests.conftest import recorded

REPO = Path(__file__).resolve().parents[1]
# Not a scrub pattern (0, 0x55555555, 0xAAAAAAAA), unlikely in a driver's own structures.
MARKER = 0x5CB0A7E1
MIN_COVERAGE = 0.9

pytestmark = pytest.mark.hw


# ------------------------------------------------------------------------------------------------
# Child process side.


def _child(mode: str, arguments: list[str]) -> dict[str, Any]:
    if mode == "plant":
        return {"planted_bytes": fill_free_memory(int(arguments[0]))}
    if mode == "survey":
        survey = survey_free_memory(int(arguments[0]))
        return {
            "allocated_bytes": survey.allocated_bytes,
            "examined_bytes": survey.examined_bytes,
            "matching_words": survey.matching_words,
            "memory_total_bytes": survey.memory_total_bytes,
        }
    if mode == "scrub":
        target = ScrubTarget.from_dict(json.loads(arguments[0]))
        policy = arguments[1]
        backend = CudaScrubBackend(shared_memory=arguments[2] == "shared")
        passes = backend.scrub(target, POLICY_PATTERNS[policy])
        result = ScrubResult(
            backend=backend.name,
            policy=policy,
            total_bytes=target.total_bytes,
            passes=passes,
            detail=backend.detail,
        )
        report = backend.last_report
        assert report is not None
        return {
            "result": result.to_dict(),
            "coverage": result.coverage,
            "verified": result.verified,
            "allocated_bytes": report.allocated_bytes,
            "chunk_count": report.chunk_count,
            "memory_free_bytes": report.memory_free_bytes,
            "memory_total_bytes": report.memory_total_bytes,
            "shared_memory": None if report.shared_memory is None else vars(report.shared_memory),
        }
    if mode == "bench":
        return benchmark_cuda()
    raise SystemExit(f"unknown mode {mode}")


# ------------------------------------------------------------------------------------------------
# Test side.


def run_child(visible_device: str, mode: str, *arguments: str) -> dict[str, Any]:
    environment = dict(os.environ, CUDA_VISIBLE_DEVICES=visible_device, PYTHONPATH=str(REPO))
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), mode, *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=environment,
        check=False,
    )
    assert completed.returncode == 0, f"{mode} failed:\n{completed.stdout}\n{completed.stderr}"
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def scrub_record() -> Iterator[dict[str, Any]]:
    """Written to $OUT/scrub-record.json when $OUT is set."""
    with recorded("scrub-record.json") as findings:
        yield findings


@pytest.fixture(scope="module")
def target(real_nvml: NvmlBackend, scrub_record: dict[str, Any]) -> dict[str, Any]:
    """The first whole GPU without MIG, or the first existing MIG device; never changes MIG."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        pytest.skip(f"no CUDA driver library: libcuda.so.1 cannot be loaded ({error})")
    chosen: dict[str, Any]
    for gpu in real_nvml.inventory():
        if not gpu.mig_current:
            chosen = {
                "partition_uuid": gpu.uuid,
                "gpu_uuid": gpu.uuid,
                "gpu_index": gpu.index,
                "kind": "gpu",
                "visible_device": gpu.uuid,
                "total_bytes": gpu.memory_total_bytes,
            }
            break
        instances = [i for i in gpu.instances if i.uuid]
        if instances:
            chosen = {
                "partition_uuid": instances[0].uuid,
                "gpu_uuid": gpu.uuid,
                "gpu_index": gpu.index,
                "kind": "mig",
                "visible_device": instances[0].uuid,
                "total_bytes": instances[0].memory_bytes,
            }
            break
    else:
        pytest.skip("every GPU is in MIG mode without a MIG device, and this test creates none")
    scrub_record["target"] = chosen
    scrub_record["gpu_name"] = gpu.name
    scrub_record["driver_version"] = real_nvml.driver_version()
    return chosen


@pytest.fixture(scope="module")
def zero_scrub_of_planted_memory(
    target: dict[str, Any], scrub_record: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The control (plant, then look without a scrub), then plant, scrub (`zero` with the on-chip
    pass) and look again; each step in its own process."""
    visible = target["visible_device"]
    planted = run_child(visible, "plant", str(MARKER))
    control = run_child(visible, "survey", str(MARKER))
    scrub_record["control_without_scrub"] = {**planted, **control}

    planted = run_child(visible, "plant", str(MARKER))
    scrub = run_child(visible, "scrub", json.dumps(target), "zero", "shared")
    after = run_child(visible, "survey", str(MARKER))
    scrub_record["zero_with_shared_memory"] = {"planted": planted, "scrub": scrub, "after": after}
    scrub_record["driver_clears_memory_between_processes"] = control["matching_words"] == 0
    return {"control": control, "scrub": scrub, "after": after}


def test_zero_scrub_with_shared_memory_verifies(
    zero_scrub_of_planted_memory: dict[str, dict[str, Any]],
) -> None:
    scrub = zero_scrub_of_planted_memory["scrub"]
    assert scrub["verified"], scrub["result"]["detail"]
    assert scrub["coverage"] >= MIN_COVERAGE, scrub["result"]["detail"]
    assert scrub["coverage"] <= 1.0
    (only_pass,) = scrub["result"]["passes"]
    assert only_pass["bytes_verified"] == only_pass["bytes_written"] == scrub["allocated_bytes"]
    shared = scrub["shared_memory"]
    assert shared["sms_reached"] == shared["sm_count"]
    assert shared["mismatched_words"] == 0


def test_zero_scrub_removes_a_planted_word(
    zero_scrub_of_planted_memory: dict[str, dict[str, Any]], scrub_record: dict[str, Any]
) -> None:
    """Passes only where the same check, run on the control, would have failed: otherwise the
    driver (or anything else before our scrub) had already removed the word, and a pass would
    say nothing about the scrub."""
    control = zero_scrub_of_planted_memory["control"]
    scrub = zero_scrub_of_planted_memory["scrub"]
    after = zero_scrub_of_planted_memory["after"]
    unscrubbed = max(0, after["memory_total_bytes"] - scrub["allocated_bytes"])
    control_bytes = control["matching_words"] * 4
    scrub_record["residue_demonstrated"] = control_bytes > unscrubbed
    if control_bytes <= unscrubbed:
        pytest.skip(
            f"residue not demonstrated: without a scrub {control_bytes} B of the planted word "
            f"reached the next process, no more than the {unscrubbed} B this check tolerates "
            "after a scrub (the driver cleared the memory before our scrub could), so the "
            "check cannot tell a working scrub from none"
        )
    assert after["matching_words"] * 4 <= unscrubbed, (
        f"{after['matching_words']} planted words survived the scrub, more than the "
        f"{unscrubbed} B it could not reach"
    )


def test_multi_pass_scrub_verifies_every_pattern(
    target: dict[str, Any], scrub_record: dict[str, Any]
) -> None:
    scrub = run_child(target["visible_device"], "scrub", json.dumps(target), "multi-pass", "-")
    scrub_record["multi_pass"] = scrub
    passes = scrub["result"]["passes"]
    assert [p["pattern"] for p in passes] == [0x55555555, 0xAAAAAAAA, 0]
    assert all(p["mismatched_bytes"] == 0 for p in passes)
    assert scrub["verified"]
    assert scrub["coverage"] >= MIN_COVERAGE


def test_benchmark_against_a_device_copy(
    target: dict[str, Any], scrub_record: dict[str, Any]
) -> None:
    """Recorded, not asserted against a threshold: tests never assert wall-clock times."""
    result = run_child(target["visible_device"], "bench")
    scrub_record["benchmark"] = result
    assert result["copy_bytes_per_s"] > 0
    assert result["scrub_write_bytes_per_s"] > 0
    assert result["scrub_verify_bytes_per_s"] > 0
    # Every ratio names its baseline, a figure measured in this run and described in the result.
    assert set(result["ratio_baselines"]) == {"write_ratio", "verify_ratio"}
    for ratio, baseline in result["ratio_baselines"].items():
        assert baseline in result["measured_with"]
        measured = result[f"scrub_{ratio.removesuffix('_ratio')}_bytes_per_s"]
        assert result[ratio] == pytest.approx(measured / result[baseline])


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], sys.argv[2:])))
