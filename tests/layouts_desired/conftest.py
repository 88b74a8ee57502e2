"""A simulated 2-GPU H100 node whose agent can be restarted with another [layout] section, and
the helpers the desired-layout and hook tests share."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import config_as_dict, load_config, parse_config, to_toml
from agent.sim.node import SimNode, init_sim_node

# The lease tests' real cgroups (v1 devices and v2), for tests that need a tenant.
from tests.leases.conftest import cgroup_parents  # noqa: F401 - a fixture
from tests.support import REPO, RunningAgent, running_agent


@pytest.fixture
def tenant_node(tmp_path: Path, cgroup_parents: dict[str, Path]) -> SimNode:  # noqa: F811
    return init_sim_node(
        tmp_path / "node", "h100x2", cgroup_parents=list(cgroup_parents.values()),
        slice_bytes=1 << 20,
    )  # fmt: skip


@pytest.fixture
def tenant_agent(tenant_node: SimNode) -> Iterator[RunningAgent]:
    with running_agent(tenant_node) as running:
        yield running


def configure_layout(agent: RunningAgent, **layout: Any) -> None:
    """Set [layout] keys in the agent's config (read at its next start)."""
    document = config_as_dict(load_config(agent.config_path))
    document["layout"].update(layout)
    agent.config_path.write_text(to_toml(parse_config(document)))
    agent.config = load_config(agent.config_path)


def restart(agent: RunningAgent, env: dict[str, str] | None = None) -> None:
    """Stop the agent cleanly and start it again; returns once its start-up re-apply of the
    desired layout (if it has one) has logged every GPU's outcome."""
    agent.stop()
    agent.start(env=env)


def start_up_outcomes(agent: RunningAgent, expected: int, timeout: float = 60) -> dict[str, Any]:
    """GPU UUID -> the ``layout_desired_start_up`` event of this start, once ``expected`` GPUs
    have one."""
    deadline = time.monotonic() + timeout
    found: dict[str, Any] = {}
    while time.monotonic() < deadline:
        found = {
            event["gpu_uuid"]: event
            for event in log_events(agent)
            if event.get("event") == "layout_desired_start_up"
        }
        if len(found) >= expected:
            return found
        time.sleep(0.1)
    raise AssertionError(f"start-up outcomes {found} after {timeout}s:\n{agent.log()[-3000:]}")


def log_events(agent: RunningAgent) -> list[dict[str, Any]]:
    events = []
    for line in agent.log().splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


def profiles(agent: RunningAgent, gpu: int) -> Counter[str]:
    status = agent.cli_json("status")
    return Counter(i["profile"] for i in status["gpus"][gpu]["instances"])


def instances(agent: RunningAgent, gpu: int) -> list[dict[str, Any]]:
    return list(agent.cli_json("status")["gpus"][gpu]["instances"])


def desired(agent: RunningAgent) -> dict[int, dict[str, Any]]:
    """GPU index -> its desired layout as `layout desired --json` shows it (present GPUs)."""
    return {g["gpu_index"]: g for g in agent.cli_json("layout", "desired")["gpus"] if g["present"]}


# NVML calls from another process, as nvidia-smi or mig-parted would make them while the agent
# is down: destroy a GPU instance (its compute instances first), or create one.
OUTSIDE = """
import sys
from pathlib import Path
from agent.config import load_config
from agent.hw.mig.geometry import Placement
from agent.hw.nvml import NvmlBackend
config = load_config(Path(sys.argv[1]))
with NvmlBackend(config.nvml.library, config.nvml.sim_dir) as nvml:
    gpu = int(sys.argv[3])
    if sys.argv[2] == "destroy":
        nvml.destroy_instance(gpu, int(sys.argv[4]))
    elif sys.argv[2] == "create":
        profile = nvml.geometry(gpu).profile(sys.argv[4])
        nvml.create_instance(gpu, Placement(profile.profile_id, int(sys.argv[5]),
                                            profile.memory_slices))
    else:
        nvml.set_mig_mode(gpu, sys.argv[4] == "on")
"""


def outside(agent: RunningAgent, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-c", OUTSIDE, str(agent.config_path), *args],
        check=True, cwd=REPO, timeout=60, capture_output=True,
    )  # fmt: skip
