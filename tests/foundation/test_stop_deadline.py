"""A stop (SIGTERM) ends even when a task's clean-up waits for ever, as aiomqtt's exit waits for
the broker's goodbye without a timeout: after STOP_OVERDUE_S the tasks still running are logged
with where they wait and cancelled once more (agent/runtime/tasks.py ``watch_stop``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal

from structlog.testing import capture_logs

from agent.config import load_config
from agent.runtime.failpoints import ENVIRONMENT_VARIABLE, Fault
from agent.runtime.tasks import await_chain, watch_stop
from agent.sim.node import SimNode
from tests.support import RunningAgent

# Faults this module exercises (tests/foundation/test_failpoints.py).
COVERED = frozenset([Fault.STOP_CLEANUP_HANGS])


async def _goodbye_never_comes() -> None:
    try:
        await asyncio.Event().wait()
    finally:
        await asyncio.Event().wait()


async def _inner_wait(event: asyncio.Event) -> None:
    await event.wait()


async def _outer_wait(event: asyncio.Event) -> None:
    await _inner_wait(event)


def test_await_chain_names_each_coroutine_down_to_the_future() -> None:
    async def main() -> str:
        event = asyncio.Event()
        task = asyncio.create_task(_outer_wait(event))
        await asyncio.sleep(0)
        chain = await_chain(task)
        event.set()
        await task
        return chain

    chain = asyncio.run(main())
    names = [part.split(" ")[0] for part in chain.split(" > ")]
    # The last is what the innermost awaits: the event's future (its iterator, in C).
    assert names[:2] == ["_outer_wait", "_inner_wait"] and names[-1].startswith("Future"), chain
    assert "test_stop_deadline.py:" in chain


def test_a_clean_up_that_swallows_the_stop_is_cancelled_again() -> None:
    async def main() -> None:
        current = asyncio.current_task()
        assert current is not None

        def stop() -> None:  # as the agent's SIGTERM handler does
            watch_stop(current, 0.2)
            current.cancel()

        asyncio.get_running_loop().call_later(0.05, stop)
        async with asyncio.TaskGroup() as group:
            group.create_task(_goodbye_never_comes(), name="hangs")
            group.create_task(asyncio.sleep(3600), name="sleeps")

    with capture_logs() as logs, contextlib.suppress(asyncio.CancelledError):
        asyncio.run(main())
    overdue = [entry for entry in logs if entry["event"] == "agent_stop_overdue"]
    assert len(overdue) == 1, logs
    # Only the task whose clean-up hung was still there, waiting in its finally block.
    assert list(overdue[0]["tasks"]) == ["hangs"]
    assert overdue[0]["tasks"]["hangs"].startswith("_goodbye_never_comes (")
    assert not [entry for entry in logs if entry["event"] == "agent_stop_forced"]


def test_the_agent_stops_when_a_clean_up_hangs(sim_node: SimNode) -> None:
    agent = RunningAgent(node=sim_node, config=load_config(sim_node.config_path))
    agent.start(env={ENVIRONMENT_VARIABLE: Fault.STOP_CLEANUP_HANGS})
    # Exits with 0 well within the unit's TimeoutStopSec (the stop's timeout here): a hang in
    # one clean-up costs STOP_OVERDUE_S, not the stop.
    assert agent.stop(signal.SIGTERM, timeout=60) == 0, agent.log()[-3000:]
    events = [json.loads(line) for line in agent.log().splitlines() if line.startswith("{")]
    names = [event["event"] for event in events]
    overdue = next(event for event in events if event["event"] == "agent_stop_overdue")
    assert list(overdue["tasks"]) == ["fault: clean-up hangs"], overdue
    assert "_cleanup_that_hangs" in overdue["tasks"]["fault: clean-up hangs"]
    assert names.index("agent_stop_overdue") < names.index("agent_stopped")
    assert "agent_stop_forced" not in names
