"""Ending a helper task must not swallow a cancellation of the task that ends it (the agent once
ignored SIGTERM that way: its link task, cancelled while it closed an MQTT session for a
failback, ran on and the agent never stopped)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

import pytest

from agent.runtime.tasks import cancel_and_wait


async def _slow_to_stop(stopping: asyncio.Event) -> None:
    """A helper whose clean-up takes a while (as publishing a last MQTT state does)."""
    try:
        await asyncio.sleep(3600)
    finally:
        stopping.set()
        await asyncio.shield(asyncio.sleep(0.2))


async def _owner(stop_helper: object, reached: asyncio.Event) -> str:
    stopping = asyncio.Event()
    helper = asyncio.create_task(_slow_to_stop(stopping))
    await asyncio.sleep(0)
    await stop_helper(helper, stopping)  # type: ignore[operator]
    reached.set()
    await asyncio.sleep(3600)  # runs on "as if nothing happened" if the cancellation was lost
    return "ran on"


async def _old_idiom(helper: asyncio.Task[None], stopping: asyncio.Event) -> None:
    helper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await helper


async def _helper_function(helper: asyncio.Task[None], stopping: asyncio.Event) -> None:
    await cancel_and_wait(helper)


def _cancel_owner_while_it_waits(stop_helper: object) -> bool:
    """True if the owner, cancelled while it waits for its helper to end, ends cancelled."""

    async def scenario() -> bool:
        reached = asyncio.Event()
        owner = asyncio.create_task(_owner(stop_helper, reached))
        await asyncio.sleep(0.05)  # the owner now waits in its helper's clean-up
        owner.cancel()  # SIGTERM
        done, _ = await asyncio.wait({owner}, timeout=2)
        if not done:
            owner.cancel()  # the lost cancellation, for the test's own clean-up
            with contextlib.suppress(asyncio.CancelledError):
                await owner
            return False
        return owner.cancelled()

    return asyncio.run(scenario())


def test_the_usual_idiom_loses_the_owners_cancellation() -> None:
    """The control: what this module guards against does happen with the usual idiom."""
    assert not _cancel_owner_while_it_waits(_old_idiom)


def test_cancel_and_wait_keeps_the_owners_cancellation() -> None:
    assert _cancel_owner_while_it_waits(_helper_function)


def test_a_helper_that_ends_on_its_own_cancellation_is_not_an_error() -> None:
    async def scenario() -> None:
        helper = asyncio.create_task(asyncio.sleep(3600))
        await asyncio.sleep(0)
        await cancel_and_wait(helper)
        assert helper.cancelled()

    asyncio.run(scenario())


def test_a_helper_failing_while_it_stops_propagates() -> None:
    async def failing() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            raise LookupError("clean-up failed")

    async def scenario() -> None:
        helper = asyncio.create_task(failing())
        await asyncio.sleep(0)
        await cancel_and_wait(helper)

    with pytest.raises(LookupError, match="clean-up failed"):
        asyncio.run(scenario())


def test_clean_up_of_a_cancelled_task_goes_on_after_its_helper_ends() -> None:
    """Inside the clean-up of a task being cancelled (an MQTT session closing: stop the pump,
    then publish the last state), ending a helper must not cut the rest of the clean-up short."""
    steps: list[str] = []

    async def session() -> None:
        pump = asyncio.create_task(asyncio.sleep(3600))
        try:
            await asyncio.sleep(3600)
        finally:
            await cancel_and_wait(pump)
            steps.append("pump stopped")
            await asyncio.sleep(0.01)
            steps.append("last state published")

    async def scenario() -> None:
        task = asyncio.create_task(session())
        await asyncio.sleep(0.01)
        await cancel_and_wait(task)

    asyncio.run(scenario())
    assert steps == ["pump stopped", "last state published"]


def _cancelled_as_it_wakes(wait: object) -> bool:
    """A loop waiting for an event with a timeout, woken and cancelled in the same turn of the
    event loop (a report queued just as SIGTERM arrives): whether the loop ends cancelled."""

    async def scenario() -> bool:
        wake = asyncio.Event()

        async def loop() -> None:
            while True:
                with contextlib.suppress(TimeoutError):
                    await wait(wake)  # type: ignore[operator]
                wake.clear()
                await asyncio.sleep(0)

        task = asyncio.create_task(loop())
        await asyncio.sleep(0.01)
        wake.set()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return False
        return task.cancelled()

    return asyncio.run(scenario())


async def _with_wait_for(wake: asyncio.Event) -> None:
    await asyncio.wait_for(wake.wait(), 10)


async def _with_timeout(wake: asyncio.Event) -> None:
    async with asyncio.timeout(10):
        await wake.wait()


def test_a_timed_wait_keeps_a_cancellation_that_arrives_with_the_wake_up() -> None:
    """Python 3.11's ``asyncio.wait_for`` returns the result when its awaitable finished in the
    turn it was cancelled, and the cancellation is lost (the agent once ignored SIGTERM this
    way). ``asyncio.timeout`` keeps it; the agent uses only that."""
    assert _cancelled_as_it_wakes(_with_timeout)
    if sys.version_info < (3, 12):
        assert not _cancelled_as_it_wakes(_with_wait_for), "the control: the hazard is real here"


def test_the_agent_never_uses_asyncio_wait_for() -> None:
    agent = Path(__file__).resolve().parents[2] / "agent"
    users = [
        str(path.relative_to(agent))
        for path in agent.rglob("*.py")
        if "asyncio.wait_for(" in path.read_text()
    ]
    assert not users, f"use `async with asyncio.timeout(...)` instead of wait_for in {users}"
