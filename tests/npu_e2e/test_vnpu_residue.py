"""No residue between vNPU tenants: a secret left in one vNPU's memory is gone before any vNPU
made from the same memory (a relayout) can be read."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path
from typing import Any

from agent.config import load_config
from agent.hw.ascend.backend import AscendBackend
from agent.sim import workload
from agent.sim.node import init_sim_node
from tests.leases.helpers import any_tenant_cgroup
from tests.npu_e2e.test_vnpu_layout_and_fence import npu_nodes, vnpus
from tests.support import (
    REPO,
    RunningAgent,
    probe,
    running_agent,
    wait_all_clean,
    wait_settled,
    wait_until,
)

SECRET = "tenant-a-npu-weights-0xC0FFEE"


def _alice_on_the_first_of(
    agent: RunningAgent, cgroup_parents: dict[str, Path], layout: str, cgroup_name: str
) -> tuple[list[dict[str, Any]], Path, dict[str, Any]]:
    """NPU 0 split as ``layout``; its vNPUs by UUID, and alice's lease on the first of them."""
    agent.cli_json("layout", "apply", "--npu", "0", layout)
    wait_all_clean(agent)
    split = sorted(vnpus(agent, 0), key=lambda p: p["uuid"])
    cgroup = any_tenant_cgroup(cgroup_parents, cgroup_name)
    lease = agent.cli_json(
        "lease", "grant", "--tenant", "alice", "--partition", split[0]["uuid"],
        "--cgroup", str(cgroup),
    )["lease"]  # fmt: skip
    return split, cgroup, lease


def test_secret_in_a_vnpu_never_reaches_the_next_tenants(
    npu910_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    agent = npu910_agent
    [first, _], _, lease = _alice_on_the_first_of(agent, cgroup_parents, "vir16=2", "a")
    assert (
        agent.cli("sim", "write", "--partition", first["uuid"], "--pattern", SECRET).returncode == 0
    )
    found = agent.cli_json("sim", "read", "--partition", first["uuid"], "--find", SECRET)
    assert found["count"] > 1000  # the vNPU's 16 units hold the secret

    released = agent.cli_json("lease", "release", lease["id"])
    assert released["state"] == "free" and released["clean"] is True
    # Relayout: the vir16s go, eight vir04s take the same memory units.
    agent.cli_json("layout", "apply", "--npu", "0", "vir04=8")
    wait_all_clean(agent)
    small = vnpus(agent, 0)
    assert sorted(p["profile"] for p in small) == ["vir04"] * 8
    reached = 0
    for partition in small:
        read = agent.cli_json("sim", "read", "--partition", partition["uuid"], "--find", SECRET)
        assert read["count"] == 0, partition
        reached += read["bytes_read"]
    assert reached == 32 * agent.config.sim.slice_bytes  # every unit of the chip was read


def test_without_a_scrub_the_secret_would_leak(tmp_path: Path) -> None:
    """The control: dcmi-sim gives a new vNPU the units a destroyed one left, residue and all."""
    node = init_sim_node(tmp_path / "node", "ascend910x1", slice_bytes=1 << 18)
    config = load_config(node.config_path)
    with AscendBackend(config.dcmi.library, config.dcmi.sim_dir) as backend:
        big = backend.create_vnpu(0, "vir16")
        workload.write_pattern(config, big.uuid, SECRET)
        backend.destroy_vnpu(0, big.gpu_instance_id)  # no scrub
        small = backend.create_vnpu(0, "vir04")
    assert set(small.units) <= set(big.units)
    _, count = workload.find_pattern(config, small.uuid, SECRET)
    assert count > 1000


def test_no_npu_scrub_backend_means_quarantine(tmp_path: Path) -> None:
    """On hardware there is no NPU scrub worker yet: a node whose scrub backend is not the
    simulated memory quarantines its NPUs rather than calling them clean."""
    node = init_sim_node(tmp_path / "node", "ascend910x2", slice_bytes=1 << 18)
    text = node.config_path.read_text()
    assert 'backend = "simmem"' in text
    node.config_path.write_text(text.replace('backend = "simmem"', 'backend = "cuda"'))
    with running_agent(node) as agent:
        settled = wait_settled(agent)
    assert {p["state"] for p in settled} == {"quarantined"}
    assert all("no scrub backend for Ascend NPU memory" in p["reason"] for p in settled)


# What `npu-smi set -t destroy-vnpu` / `create-vnpu` do: DCMI calls from another process, which
# the agent only learns of at its next inventory refresh.
BEHIND_OUR_BACK = """
import sys
from pathlib import Path
from agent.config import load_config
from agent.hw.ascend.backend import AscendBackend
config = load_config(Path(sys.argv[1]))
with AscendBackend(config.dcmi.library, config.dcmi.sim_dir) as dcmi:
    dcmi.destroy_vnpu(0, int(sys.argv[2]))
    print(dcmi.create_vnpu(0, sys.argv[3]).gpu_instance_id)
"""


def test_a_vnpu_replaced_behind_our_back_ends_lost_and_never_free_clean(
    npu910_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    agent = npu910_agent
    [first, second], cgroup, lease = _alice_on_the_first_of(
        agent, cgroup_parents, "vir08=2", "alice"
    )
    agent.cli("sim", "write", "--partition", first["uuid"], "--pattern", SECRET)
    # Destroyed and a larger vNPU made in its place, on its memory, with the same vdev id.
    made = subprocess.run(
        [sys.executable, "-c", BEHIND_OUR_BACK, str(agent.config_path), "100", "vir16"],
        check=True, capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert made.stdout.strip() == "100"
    agent.cli_json("status")  # the next refresh finds it changed
    leases = agent.cli_json("lease", "list", "--all")["leases"]
    assert [entry["state"] for entry in leases if entry["id"] == lease["id"]] == ["lost"]
    replaced = next(p for p in agent.partitions() if p["uuid"] == first["uuid"])
    assert replaced["profile"] == "vir16"
    assert not (replaced["state"] == "free" and replaced["clean"]), replaced
    # The lost lease's fence is revoked by its own task, just after the refresh.
    wait_until(
        lambda: set(probe(cgroup, npu_nodes(agent)).values()) == {errno.EPERM},
        "alice fenced off every NPU node",
    )
    untouched = next(p for p in agent.partitions() if p["uuid"] == second["uuid"])
    assert untouched["state"] == "free" and untouched["clean"]
    # Cleared by an operator: scrubbed before anyone reads it.
    agent.cli_json("partition", "clear", first["uuid"], "--reason", "checked")
    found = agent.cli_json("sim", "read", "--partition", first["uuid"], "--find", SECRET)
    assert found["count"] == 0
