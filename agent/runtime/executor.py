"""One worker thread for blocking library calls (NVML, SQLite, bpf(2)).

NVML and our SQLite connection are used from one thread at a time; a single worker serialises them
without locks and keeps the event loop (watchdog pings, the admin socket) responsive. The thread
lives exactly as long as the daemon's task group.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class BlockingExecutor:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="accelguard-blocking")

    async def call(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        # The caller's context (structlog's bound node, lease, tenant) follows the call into the
        # thread, so what a blocking step logs says whose work it was.
        context = contextvars.copy_context()
        return await loop.run_in_executor(
            self._pool, functools.partial(context.run, function, *args, **kwargs)
        )

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
