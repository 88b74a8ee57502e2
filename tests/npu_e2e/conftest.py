"""Simulated NPU, mixed and /dev/accel nodes with a real agent, for the end-to-end NPU tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sim.node import init_sim_node
from tests.leases.conftest import cgroup_parents, hierarchy
from tests.support import RunningAgent, running_agent

__all__ = ["cgroup_parents", "hierarchy"]

# A 910 chip has 32 memory units (one per AI Core), a 910B3 20: small units keep scrubs quick.
UNIT_BYTES = 256 << 10


def _agent(tmp_path: Path, topology: str, parents: dict[str, Path]) -> Iterator[RunningAgent]:
    node = init_sim_node(
        tmp_path / "node", topology, cgroup_parents=list(parents.values()), slice_bytes=UNIT_BYTES
    )
    with running_agent(node) as running:
        yield running


@pytest.fixture
def npu910_agent(tmp_path: Path, cgroup_parents: dict[str, Path]) -> Iterator[RunningAgent]:
    yield from _agent(tmp_path, "ascend910x8", cgroup_parents)


@pytest.fixture
def npu910b_agent(tmp_path: Path, cgroup_parents: dict[str, Path]) -> Iterator[RunningAgent]:
    yield from _agent(tmp_path, "ascend910bx8", cgroup_parents)


@pytest.fixture
def mixed_agent(tmp_path: Path, cgroup_parents: dict[str, Path]) -> Iterator[RunningAgent]:
    yield from _agent(tmp_path, "h100x1,ascend910bx2", cgroup_parents)


@pytest.fixture(params=[False, True], ids=["strict", "accept-unverified"])
def accel_agent(
    request: pytest.FixtureRequest, tmp_path: Path, cgroup_parents: dict[str, Path]
) -> Iterator[RunningAgent]:
    # to_toml writes every section; a second [scrub] table would be invalid TOML, so the policy
    # is switched in place.
    node = init_sim_node(
        tmp_path / "node", "accel2", cgroup_parents=list(cgroup_parents.values()),
        slice_bytes=UNIT_BYTES,
    )  # fmt: skip
    if request.param:
        text = node.config_path.read_text()
        assert "accept_unverified = false" in text
        node.config_path.write_text(
            text.replace("accept_unverified = false", "accept_unverified = true")
        )
    with running_agent(node) as running:
        yield running
