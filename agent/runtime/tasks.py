"""Ending tasks: a helper task from the task that started it, and the agent's own stop."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import structlog

from agent.errors import ExitCode

log = structlog.get_logger(__name__)


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has ended; an exception other than its cancellation
    propagates.

    The usual ``task.cancel(); with suppress(CancelledError): await task`` also swallows a
    cancellation of the *caller* that arrives while it waits there, and the caller runs on as if
    nothing had happened: the agent once ignored SIGTERM this way, its link task cancelled just
    as an MQTT session was being closed for a failback. Here a cancellation of the caller
    requested during the wait (``Task.cancelling`` grew) is raised again; one the caller was
    already handling (this call in its clean-up) is not, so its clean-up goes on."""
    current = asyncio.current_task()
    before = current.cancelling() if current is not None else 0
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if current is not None and current.cancelling() > before:
            raise


def await_chain(task: asyncio.Task[Any]) -> str:
    """Where ``task`` waits: its coroutines from the outermost to the one awaited last, each as
    ``function (file:line)``, and what that one awaits (a Future) by its type."""
    parts: list[str] = []
    awaitable: Any = task.get_coro()
    while awaitable is not None and len(parts) < 64:
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "ag_frame", None)
        if frame is None:
            parts.append(type(awaitable).__name__)
            break
        code = frame.f_code
        parts.append(f"{code.co_name} ({Path(code.co_filename).name}:{frame.f_lineno})")
        awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "ag_await", None)
    return " > ".join(parts)


def watch_stop(main: asyncio.Task[Any], after_s: float) -> None:
    """Bound a stop that ``main.cancel()`` asked for (SIGTERM).

    A clean-up can wait for ever: a library's exit waiting for a peer's goodbye that never comes
    (aiomqtt's ``__aexit__`` waits for the broker's disconnect without a timeout), spending the
    one cancellation a task group gives each task. After ``after_s`` every task still running
    is logged with where it waits (``agent_stop_overdue``) and cancelled once more; if the stop
    is still not done ``after_s`` later, the process exits (``agent_stop_forced``, exit 1)
    before the service manager's SIGKILL: the journal is crash-safe, an agent that never stops
    is not."""
    loop = asyncio.get_running_loop()

    def overdue(round_: int) -> None:
        if main.done():
            return
        pending = [t for t in asyncio.all_tasks(loop) if t is not main and not t.done()]
        log.error(
            "agent_stop_overdue" if round_ == 1 else "agent_stop_forced",
            seconds=after_s * round_,
            tasks={task.get_name(): await_chain(task) for task in pending},
        )
        if round_ == 1:
            for task in pending:
                task.cancel()
            loop.call_later(after_s, overdue, 2)
            return
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(ExitCode.FAILED)

    loop.call_later(after_s, overdue, 1)
