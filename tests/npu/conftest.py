"""Fixtures for the Ascend backend tests: dcmi-sim built once, and simulated nodes with an
opened ``AscendBackend`` on each.

The library keeps one DCMI session per process and dcmi-sim reads DCMI_SIM_DIR at every
``dcmi_init``: a node made here opens its backend (which points DCMI_SIM_DIR at the node), and
a test that uses two nodes re-opens the one it switches to (``NpuNode.activate``).
"""

from __future__ import annotations

import ctypes
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from agent.hw.ascend.backend import AscendBackend
from tests.dcmisim.dcmi import LIBRARY, SimNode, new_sim_dir, topology
from tests.support import restored_environment

_ENVIRONMENT = ("DCMI_SIM_DIR", "DCMI_SIM_TOPOLOGY")


@dataclass
class NpuNode:
    """A simulated node: its directory and raw bindings (``sim``) and the backend under test."""

    sim: SimNode
    backend: AscendBackend

    def activate(self) -> None:
        """Make this node the process's DCMI session again (after another node's)."""
        self.backend.close()
        self.backend.open()

    def counter(self) -> int:
        return self.sim.counter()


MakeNpuNode = Callable[[str], NpuNode]


@pytest.fixture
def make_npu_node(dcmi_library: ctypes.CDLL) -> Iterator[MakeNpuNode]:
    """Factory: a fresh DCMI_SIM_DIR with this topology text and an opened backend on it."""
    made: list[NpuNode] = []

    def make(topology: str) -> NpuNode:
        path = new_sim_dir()
        (path / "topology").write_text(topology)
        node = NpuNode(SimNode(path, dcmi_library), AscendBackend(str(LIBRARY), str(path)))
        made.append(node)
        node.backend.open()
        return node

    with restored_environment(_ENVIRONMENT):
        os.environ.pop("DCMI_SIM_TOPOLOGY", None)
        try:
            yield make
        finally:
            for node in made:
                node.backend.close()
                shutil.rmtree(node.sim.path, ignore_errors=True)


@pytest.fixture
def node910(make_npu_node: MakeNpuNode) -> NpuNode:
    """Eight Atlas training NPUs (Ascend 910A, 32 AI Cores)."""
    return make_npu_node(topology("910A"))


@pytest.fixture
def node910b(make_npu_node: MakeNpuNode) -> NpuNode:
    """Eight Atlas 800T A2 NPUs (Ascend 910B3, 20 AI Cores)."""
    return make_npu_node(topology("910B3"))
