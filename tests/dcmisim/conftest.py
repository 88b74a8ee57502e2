"""Fixtures for the dcmi-sim tests: the library built and loaded once, and fresh nodes.

Everything goes through the DCMI entry points with ctypes, as the Ascend backend will. The
library keeps one session per process; ``dcmi_init`` re-reads DCMI_SIM_DIR, so each test
initialises it on its own directory.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from collections.abc import Callable, Iterator

import pytest

from tests.dcmisim.dcmi import DCMI_OK, SimNode, new_sim_dir
from tests.support import restored_environment

MakeNode = Callable[..., SimNode]

_ENVIRONMENT = ("DCMI_SIM_DIR", "DCMI_SIM_TOPOLOGY")


@pytest.fixture
def make_node(dcmi_library: ctypes.CDLL) -> Iterator[MakeNode]:
    """Factory: a fresh DCMI_SIM_DIR with a topology file (or a DCMI_SIM_TOPOLOGY preset),
    dcmi_init called on it unless ``init=False``; removed afterwards."""
    made: list[SimNode] = []

    def make(text: str | None = None, *, preset: str | None = None, init: bool = True) -> SimNode:
        node = SimNode(path=new_sim_dir(), lib=dcmi_library)
        made.append(node)
        if text is not None:
            (node.path / "topology").write_text(text)
        if preset is None:
            os.environ.pop("DCMI_SIM_TOPOLOGY", None)
        else:
            os.environ["DCMI_SIM_TOPOLOGY"] = preset
        if init:
            assert node.init() == DCMI_OK
        return node

    with restored_environment(_ENVIRONMENT):
        try:
            yield make
        finally:
            for node in made:
                shutil.rmtree(node.path, ignore_errors=True)


@pytest.fixture
def node910(make_node: MakeNode) -> SimNode:
    """Eight Atlas training NPUs (Ascend 910A), from the preset `sim init` will use."""
    node: SimNode = make_node(preset="ascend910x8")
    return node


@pytest.fixture
def node910b(make_node: MakeNode) -> SimNode:
    """Eight Atlas 800T A2 NPUs (Ascend 910B3)."""
    node: SimNode = make_node(preset="ascend910bx8")
    return node
