"""A fresh journal for each metrics test, written through the store's own methods."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.store import Store
from tests.metrics.support import Journal


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    store = Store(tmp_path / "agent.db")
    try:
        yield Journal(store)
    finally:
        store.close()
