"""Fixtures shared by every test area: a simulated node and a running agent as a real process."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sim.node import SimNode, init_sim_node
from tests.dcmisim.dcmi import build_library, load
from tests.support import RunningAgent, running_agent


@pytest.fixture(scope="session")
def dcmi_library() -> ctypes.CDLL:
    """dcmi-sim's libdcmi.so, built once per session (tests/dcmisim, tests/npu)."""
    failure = build_library()
    if failure:
        pytest.fail(f"building dcmi-sim failed:\n{failure}")
    return load()


@pytest.fixture
def sim_node(tmp_path: Path) -> SimNode:
    return init_sim_node(tmp_path / "node", "h100x2", slice_bytes=1 << 20)


@pytest.fixture
def agent(sim_node: SimNode) -> Iterator[RunningAgent]:
    with running_agent(sim_node) as running:
        yield running
