"""Runs scrub workers: parallel across partitions, one at a time per partition, with a deadline.

A worker that outlives its deadline is killed; one that dies or prints no valid result is a
failed scrub. The caller quarantines on any ``ScrubError``: nothing unverified is called clean.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from agent.errors import ScrubError
from agent.scrub.model import BACKEND_KINDS, POLICY_PATTERNS, ScrubResult, ScrubTarget

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ScrubOutcome:
    result: ScrubResult
    started_at: float
    finished_at: float
    # Why the result does not make the partition clean; None when it does.
    failure: str | None


class ScrubRunner:
    def __init__(
        self,
        backend: str,
        deadline_s: float,
        min_coverage: float,
        shared_memory: bool = False,
        options: Mapping[str, object] | None = None,
    ) -> None:
        self._backend = backend
        # Backend settings the worker needs (the simulated memory's directory and slice size).
        self._options = dict(options or {})
        self._shared_memory = shared_memory
        self._deadline_s = deadline_s
        self._min_coverage = min_coverage
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def scrub(self, target: ScrubTarget, policy: str) -> ScrubOutcome:
        """Run a worker. Raises ScrubError when there is no result at all (hung, died, garbage);
        otherwise the outcome says whether every byte claimed was verified clean."""
        if policy not in POLICY_PATTERNS:
            known = ", ".join(POLICY_PATTERNS)
            raise ScrubError(f"unknown scrub policy {policy!r} (known: {known})")
        if target.kind not in BACKEND_KINDS.get(self._backend, frozenset()):
            # Fail closed: the partition is quarantined with this reason, never called clean.
            what = "Ascend NPU" if target.kind in ("npu", "vnpu") else f"{target.kind} partition"
            raise ScrubError(
                f"no scrub backend for {what} memory ([scrub] backend is {self._backend!r}; "
                "docs/npu.md)"
            )
        async with self._locks[target.partition_uuid]:
            started = time.time()
            result = await self._run_worker(target, policy)
            finished = time.time()
        return ScrubOutcome(result, started, finished, self._failure(target, result))

    def _failure(self, target: ScrubTarget, result: ScrubResult) -> str | None:
        if not result.verified:
            mismatched = sum(p.mismatched_bytes for p in result.passes)
            return (
                f"scrub of {target.partition_uuid} did not verify: {mismatched} bytes differ "
                "from the pattern after writing"
            )
        if result.coverage < self._min_coverage:
            return (
                f"scrub of {target.partition_uuid} covered {result.coverage:.1%} of "
                f"{result.total_bytes} bytes, below the configured minimum {self._min_coverage:.0%}"
            )
        return None

    async def _run_worker(self, target: ScrubTarget, policy: str) -> ScrubResult:
        request = json.dumps(
            {
                "backend": self._backend,
                "policy": policy,
                "patterns": list(POLICY_PATTERNS[policy]),
                "shared_memory": self._shared_memory,
                "options": self._options,
                "target": target.to_dict(),
            }
        ).encode()
        environment = {**os.environ, "CUDA_VISIBLE_DEVICES": target.visible_device}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.scrub.worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=environment,
        )  # fmt: skip
        log.info("scrub_started", partition=target.partition_uuid, pid=process.pid, policy=policy)
        try:
            async with asyncio.timeout(self._deadline_s):
                stdout, stderr = await process.communicate(request)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise ScrubError(
                f"scrub worker for {target.partition_uuid} hung past its "
                f"{self._deadline_s:g}s deadline and was killed"
            ) from None
        except asyncio.CancelledError:
            process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            how = (
                f"was killed by signal {-process.returncode}"
                if process.returncode is not None and process.returncode < 0
                else f"exited {process.returncode}"
            )
            message = stderr.decode(errors="replace").strip().splitlines()
            raise ScrubError(
                f"scrub worker for {target.partition_uuid} {how}"
                + (f": {message[-1]}" if message else "")
            )
        try:
            return ScrubResult.from_dict(json.loads(stdout))
        except (ValueError, TypeError) as error:
            raise ScrubError(
                f"scrub worker for {target.partition_uuid} printed no result: {error}"
            ) from error
