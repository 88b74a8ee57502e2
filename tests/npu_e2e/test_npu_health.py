"""NPU health through DCMI: a major fault on an NPU quarantines its partitions (a leased vNPU's
lease ends lost, its tenant fenced off), the other NPUs untouched; a clear while the fault
lasts does not put the NPU back into use."""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sim.node import init_sim_node
from tests.leases.helpers import tenant_cgroup
from tests.npu_e2e.conftest import UNIT_BYTES
from tests.npu_e2e.test_vnpu_layout_and_fence import npu_nodes, vnpus
from tests.support import RunningAgent, probe, running_agent, wait_all_clean, wait_until


@pytest.fixture
def watched_agent(tmp_path: Path, cgroup_parents: dict[str, Path]) -> Iterator[RunningAgent]:
    node = init_sim_node(
        tmp_path / "node", "ascend910x2", cgroup_parents=list(cgroup_parents.values()),
        slice_bytes=UNIT_BYTES,
    )  # fmt: skip
    text = node.config_path.read_text()
    assert "poll_interval_s = 10.0" in text
    node.config_path.write_text(text.replace("poll_interval_s = 10.0", "poll_interval_s = 0.2"))
    with running_agent(node) as agent:
        yield agent


def test_a_major_npu_fault_quarantines_its_vnpus(
    watched_agent: RunningAgent, cgroup_parents: dict[str, Path], hierarchy: str
) -> None:
    agent = watched_agent
    agent.cli_json("layout", "apply", "--npu", "0", "vir08=2")
    wait_all_clean(agent)
    tenant = tenant_cgroup(cgroup_parents, hierarchy, "npu-tenant")
    lease = agent.cli_json(
        "lease", "grant", "--tenant", "t", "--profile", "vir08", "--cgroup", str(tenant)
    )["lease"]
    health = Path(agent.config.dcmi.sim_dir) / "health"
    with health.open("a") as sim:
        sim.write("0 health 2\n0 error 0x80E01801\n")

    def faulted() -> bool:
        return all(p["state"] == "quarantined" for p in vnpus(agent, 0))

    wait_until(faulted, "quarantined")
    assert all("health major" in p["reason"] and "0x80e01801" in p["reason"]
               for p in vnpus(agent, 0))  # fmt: skip
    leases = agent.cli_json("lease", "list", "--all")["leases"]
    assert [entry["state"] for entry in leases if entry["id"] == lease["id"]] == ["lost"]
    assert set(probe(tenant, npu_nodes(agent)).values()) == {errno.EPERM}
    [whole] = [p for p in agent.partitions() if p["kind"] == "npu" and p["gpu_index"] == 1]
    assert whole["state"] == "free" and whole["clean"]  # the other NPU is untouched

    # Cleared while the fault lasts: scrubbed, then quarantined again at the next poll.
    [first, _] = vnpus(agent, 0)
    cleared = agent.cli("partition", "clear", first["uuid"], "--reason", "tried")
    assert cleared.returncode in (0, 3), cleared.stderr  # 3: the next poll was quicker
    wait_until(faulted, "quarantined again")
    # The fault gone, a clear puts it back into use.
    with health.open("a") as sim:
        sim.write("0 health 0\n0 error clear\n")
    for partition in vnpus(agent, 0):
        cleared = agent.cli_json("partition", "clear", partition["uuid"], "--reason", "fixed")
        assert cleared["state"] == "free" and cleared["clean"] is True
    time.sleep(1)  # several polls
    assert all(p["state"] == "free" for p in vnpus(agent, 0))
