"""A controller and simulated nodes (each with its own swtpm) as real processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.link.support import Controller, LinkNode, link_nodes


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    running = Controller(tmp_path / "controller")
    running.init()
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def two_nodes(tmp_path: Path, controller: Controller) -> Iterator[list[LinkNode]]:
    with link_nodes(tmp_path, controller, 2) as nodes:
        yield nodes


@pytest.fixture
def one_node(tmp_path: Path, controller: Controller) -> Iterator[LinkNode]:
    with link_nodes(tmp_path, controller, 1) as nodes:
        yield nodes[0]
