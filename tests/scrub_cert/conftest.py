"""A node key and a certificate issued with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.identity.node_key import NodeKey
from tests.scrub_cert.support import certify


@pytest.fixture(scope="session")
def node_key() -> NodeKey:
    return NodeKey.generate()


@pytest.fixture
def certificate(node_key: NodeKey) -> dict[str, Any]:
    return certify(node_key)


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "node.key"
