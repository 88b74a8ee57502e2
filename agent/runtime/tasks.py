"""Ending a helper task from the task that started it."""

from __future__ import annotations

import asyncio
from typing import Any


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
