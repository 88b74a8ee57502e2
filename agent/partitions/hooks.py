"""Layout apply hooks: ``[layout] before_apply`` and ``after_apply`` (docs/layouts.md).

mig-parted runs hooks around its apply (``apply-start``, ``pre-apply-mode``, ``apply-exit``) to stop
and restart GPU clients; ours are two commands with the same purpose. Invariants:

* A hook runs only around an apply that changes something; a no-op apply runs none.
* A hook is an argv list run without a shell, with a clean environment (PATH and the
  ``ACCELGUARD_*`` variables below, nothing inherited from the agent), stdin from /dev/null, in
  its own process group; at ``hook_timeout_s`` the whole group is killed.
* Its stdout and stderr (merged, the last :data:`MAX_OUTPUT_BYTES`) go to the agent's log.
* The caller decides what a failure means: a before_apply failure refuses the apply before
  anything changed; an after_apply failure is reported and the applied layout stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import structlog

from agent.runtime.tasks import cancel_and_wait

log = structlog.get_logger(__name__)

# Of a hook's output, the tail kept for the log and the response.
MAX_OUTPUT_BYTES: Final = 16 << 10
# How long the output pipe may stay open after the hook exited (a background child holding it).
OUTPUT_GRACE_S: Final = 2.0
HOOK_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class HookPhase(StrEnum):
    BEFORE_APPLY = "before_apply"
    AFTER_APPLY = "after_apply"


@dataclass(frozen=True)
class HookRun:
    phase: HookPhase
    argv: tuple[str, ...]
    exit_code: int | None  # None: it did not start
    timed_out: bool
    error: str  # why it failed; empty when it succeeded
    output: str
    duration_s: float

    @property
    def ok(self) -> bool:
        return not self.error


class LayoutHooks:
    """Runs the configured hooks; ``argv`` empty for a phase means no hook there."""

    def __init__(
        self, before_apply: Sequence[str], after_apply: Sequence[str], timeout_s: float
    ) -> None:
        self._argv = {
            HookPhase.BEFORE_APPLY: tuple(before_apply),
            HookPhase.AFTER_APPLY: tuple(after_apply),
        }
        self._timeout_s = timeout_s

    async def run(self, phase: HookPhase, environment: Mapping[str, str]) -> HookRun | None:
        """Run the hook of ``phase`` to its end (or its timeout); None when none is set."""
        argv = self._argv[phase]
        if not argv:
            return None
        started = time.monotonic()
        env = {"PATH": HOOK_PATH, "ACCELGUARD_LAYOUT_PHASE": phase.value, **environment}
        log.info("layout_hook_started", phase=phase.value, argv=list(argv))
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=env, cwd="/", start_new_session=True,
            )  # fmt: skip
        except OSError as error:
            why = f"{phase.value} hook {argv[0]} cannot run: {error.strerror or error}"
            log.error("layout_hook_failed", phase=phase.value, argv=list(argv), error=why)  # noqa: TRY400 - expected, one line
            return HookRun(phase, argv, None, False, why, "", time.monotonic() - started)
        output = bytearray()
        reader = asyncio.create_task(_collect(process, output))
        timed_out = False
        try:
            async with asyncio.timeout(self._timeout_s):
                await process.wait()
        except TimeoutError:
            timed_out = True
            _kill_group(process.pid)
            await process.wait()
        except asyncio.CancelledError:
            _kill_group(process.pid)
            await process.wait()
            reader.cancel()
            raise
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(OUTPUT_GRACE_S):
                await asyncio.shield(reader)
        await cancel_and_wait(reader)
        code = process.returncode
        text = bytes(output).decode(errors="replace")
        failure = _failure(phase, argv, code, timed_out, self._timeout_s, text)
        run = HookRun(phase, argv, code, timed_out, failure, text, time.monotonic() - started)
        fields = {"phase": phase.value, "argv": list(argv), "exit_code": code,
                  "duration_s": round(run.duration_s, 3), "output": text}  # fmt: skip
        if failure:
            log.error("layout_hook_failed", error=failure, **fields)
        else:
            log.info("layout_hook_finished", **fields)
        return run


async def _collect(process: asyncio.subprocess.Process, output: bytearray) -> None:
    assert process.stdout is not None  # noqa: S101 - created with stdout=PIPE
    while chunk := await process.stdout.read(1 << 14):
        output.extend(chunk)
        if len(output) > MAX_OUTPUT_BYTES:
            del output[: len(output) - MAX_OUTPUT_BYTES]


def _kill_group(pid: int) -> None:
    # The hook leads its own process group (start_new_session): a shell script's children die
    # with it instead of holding the GPU, or the output pipe, after the timeout.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _failure(
    phase: HookPhase,
    argv: Sequence[str],
    code: int | None,
    timed_out: bool,
    timeout_s: float,
    output: str,
) -> str:
    what = f"{phase.value} hook {argv[0]}"
    last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "")
    said = f": {last[:300]}" if last else ""
    if timed_out:
        return f"{what} did not finish within {timeout_s:g}s (layout.hook_timeout_s) and was killed"
    if code is not None and code < 0:
        return f"{what} was killed by signal {-code}{said}"
    if code != 0:
        return f"{what} exited {code}{said}"
    return ""
