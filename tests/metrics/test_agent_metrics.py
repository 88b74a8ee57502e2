"""The metrics endpoint of a running agent on a simulated node: wired into the daemon, it serves
what the journal, the health monitor and the admin calls say, in a form promtool accepts."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import config_as_dict, load_config, parse_config, to_toml
from agent.runtime.net import free_port
from agent.sim.node import init_sim_node
from tests.leases.conftest import cgroup_parents  # noqa: F401 - the fixture
from tests.leases.helpers import any_tenant_cgroup, grant
from tests.metrics.support import promtool
from tests.support import RunningAgent, running_agent, wait_all_clean


@pytest.fixture
def agent(tmp_path: Path, cgroup_parents: dict[str, Path]) -> Iterator[RunningAgent]:  # noqa: F811
    node = init_sim_node(
        tmp_path / "node", "h100x2", cgroup_parents=list(cgroup_parents.values()),
        mig_enabled=False, slice_bytes=1 << 20,
    )  # fmt: skip
    document = config_as_dict(load_config(node.config_path))
    document["metrics"]["listen"] = f"127.0.0.1:{free_port()}"
    node.config_path.write_text(to_toml(parse_config(document)))
    with running_agent(node) as running:
        yield running


def scrape(agent: RunningAgent) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://{agent.config.metrics.listen}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
        text = response.read().decode()
    assert promtool("check", "metrics", stdin=text).returncode == 0
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_agent_serves_its_metrics(
    agent: RunningAgent,
    cgroup_parents: dict[str, Path],  # noqa: F811
) -> None:
    wait_all_clean(agent)
    lease = grant(agent, "alice", any_tenant_cgroup(cgroup_parents, "alice"), profile="gpu")
    released = agent.cli("lease", "release", lease["lease"]["id"])
    assert released.returncode == 0, released.stderr
    wait_all_clean(agent)
    metrics = scrape(agent)
    assert metrics[("accelguard_partitions", (("state", "free"),))] == 2
    assert metrics[("accelguard_leases_granted_total", ())] == 1
    assert metrics[("accelguard_lease_grant_duration_seconds_count", ())] == 1
    assert metrics[("accelguard_lease_release_duration_seconds_count", ())] == 1
    assert metrics[("accelguard_gpu_healthy", (("gpu", "0"),))] == 1
    assert metrics[("accelguard_gpu_temperature_celsius", (("gpu", "1"),))] > 0
    assert not any("alice" in str(labels) for _, labels in metrics)
