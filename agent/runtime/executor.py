"""One worker thread for blocking library calls (NVML, SQLite, bpf(2)).

NVML and our SQLite connection are used from one thread at a time; a single worker serialises them
without locks and keeps the event loop (watchdog pings, the admin socket) responsive. The thread
lives exactly as long as the daemon's task group.

The worker hands each result straight to the caller's event loop (one ``call_soon_threadsafe``),
not through ``run_in_executor``'s chained futures: a grant makes several trips, and each of those
layers cost it about 35 µs.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import queue
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_Item = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[], Any]]


class BlockingExecutor:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    async def call(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        # The caller's context (structlog's bound node, lease, tenant) follows the call into the
        # thread, so what a blocking step logs says whose work it was.
        context = contextvars.copy_context()
        work = functools.partial(context.run, function, *args, **kwargs)
        with self._lock:
            if self._closed:
                raise RuntimeError("the blocking executor is shut down")
            if self._thread is None:
                # A daemon thread: shutdown() joins it; an executor never shut down (a test's)
                # must not keep the interpreter alive once its calls are done.
                self._thread = threading.Thread(
                    target=self._work, name="accelguard-blocking", daemon=True
                )
                self._thread.start()
            self._queue.put((loop, future, work))
        return await future

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            loop, future, work = item
            if future.cancelled():
                continue  # its caller gave up before it started: as a pending future's cancel
            try:
                result = work()
            except BaseException as error:  # noqa: BLE001 - handed to the caller, as executors do
                _hand_over(loop, future, None, error)
            else:
                _hand_over(loop, future, result, None)
            del item, work, future  # nothing of a finished call outlives it here

    def shutdown(self) -> None:
        """Cancel the calls not started, wait for the one running, stop the thread."""
        with self._lock:
            self._closed = True
            thread = self._thread
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                    item[0].call_soon_threadsafe(item[1].cancel)
        if thread is not None:
            self._queue.put(None)
            thread.join()


def _hand_over(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: object,
    error: BaseException | None,
) -> None:
    def settle() -> None:
        if future.cancelled():
            return
        if isinstance(error, StopIteration):
            # A future refuses StopIteration (it would end the awaiting coroutine's frame).
            future.set_exception(RuntimeError(f"blocking call raised {error!r}"))
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
        loop.call_soon_threadsafe(settle)
