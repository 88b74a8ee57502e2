"""A simulated node with two Gaudi2 cards: a sysfs tree and real char nodes (major 261)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.accel.tree import AccelNode, make_accel_node


@pytest.fixture
def accel_node(tmp_path: Path) -> AccelNode:
    return make_accel_node(tmp_path)
