"""Ending a helper task from the task that started it."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has ended; an exception other than its cancellation
    propagates.

    The usual ``task.cancel(); with suppress(CancelledError): await task`` also swallows the
    cancellation of the *caller* when the caller is cancelled while it waits there, and the
    caller runs on as if nothing had happened: the agent once ignored SIGTERM this way, its link
    task cancelled just as an MQTT session was being closed for a failback. Here the caller's
    own cancellation (``Task.cancelling``) is raised again."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
