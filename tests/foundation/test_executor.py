"""The blocking executor: one worker thread, calls in order, results and errors handed back to
the caller's loop, the caller's context carried, pending calls cancelled at shutdown."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from agent.runtime.executor import BlockingExecutor

WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")


def test_calls_run_in_order_on_one_thread_and_carry_the_callers_context() -> None:
    executor = BlockingExecutor()
    seen: list[tuple[int, str, str]] = []

    def step(number: int) -> int:
        seen.append((number, threading.current_thread().name, WHO.get()))
        return number * 10

    async def main() -> list[int]:
        WHO.set("alice")
        return list(await asyncio.gather(*(executor.call(step, n) for n in range(20))))

    try:
        assert asyncio.run(main()) == [n * 10 for n in range(20)]
    finally:
        executor.shutdown()
    assert [number for number, _, _ in seen] == list(range(20))
    assert {name for _, name, _ in seen} == {"accelguard-blocking"}
    assert {who for _, _, who in seen} == {"alice"}


def test_errors_reach_the_caller_with_their_type() -> None:
    executor = BlockingExecutor()

    def fails() -> None:
        raise ValueError("no such partition")

    def stops() -> None:
        raise StopIteration

    async def main() -> None:
        with pytest.raises(ValueError, match="no such partition"):
            await executor.call(fails)
        # A future cannot carry StopIteration: it arrives as a RuntimeError naming it.
        with pytest.raises(RuntimeError, match="StopIteration"):
            await executor.call(stops)
        assert await executor.call(int, "7") == 7  # the worker lives on

    try:
        asyncio.run(main())
    finally:
        executor.shutdown()


def test_a_call_cancelled_before_it_starts_never_runs() -> None:
    executor = BlockingExecutor()
    release = threading.Event()
    started = threading.Event()
    ran: list[str] = []

    def blocker() -> None:
        started.set()
        release.wait(30)

    async def main() -> None:
        first = asyncio.ensure_future(executor.call(blocker))
        await asyncio.to_thread(started.wait, 30)
        second = asyncio.ensure_future(executor.call(ran.append, "second"))
        await asyncio.sleep(0)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        release.set()
        await first
        await executor.call(ran.append, "third")

    try:
        asyncio.run(main())
    finally:
        executor.shutdown()
    assert ran == ["third"]


def test_shutdown_cancels_pending_calls_waits_for_the_running_one_and_refuses_new_ones() -> None:
    executor = BlockingExecutor()
    release = threading.Event()
    started = threading.Event()
    finished: list[str] = []

    def blocker() -> str:
        started.set()
        release.wait(30)
        finished.append("running")
        return "done"

    async def main() -> None:
        running = asyncio.ensure_future(executor.call(blocker))
        pending = asyncio.ensure_future(executor.call(finished.append, "pending"))
        await asyncio.to_thread(started.wait, 30)
        threading.Timer(0.05, release.set).start()
        await asyncio.to_thread(executor.shutdown)
        assert finished == ["running"]  # joined: the running call ended first
        assert await running == "done"
        with pytest.raises(asyncio.CancelledError):
            await pending
        with pytest.raises(RuntimeError, match="shut down"):
            await executor.call(finished.append, "late")

    asyncio.run(main())
    assert finished == ["running"]
