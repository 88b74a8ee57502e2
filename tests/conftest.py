"""Fixtures shared by every test area: a simulated node and a running agent as a real process."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_config
from agent.sim.node import SimNode, init_sim_node
from tests.support import RunningAgent


@pytest.fixture
def sim_node(tmp_path: Path) -> SimNode:
    return init_sim_node(tmp_path / "node", "h100x2", slice_bytes=1 << 20)


@pytest.fixture
def agent(sim_node: SimNode) -> Iterator[RunningAgent]:
    running = RunningAgent(node=sim_node, config=load_config(sim_node.config_path))
    running.start()
    try:
        yield running
    finally:
        if running.process is not None:
            running.stop(signal.SIGKILL)
