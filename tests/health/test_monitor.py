"""The health monitor on a simulated node: faults injected through the CLI (nvml-sim's control
files), the agent as a real process, tenants in real cgroups probed by the kernel.

Each fault class does what docs/health.md says: a fault that needs a GPU reset quarantines every
partition of that GPU and fences its tenants out; one NVML attributes to MIG instances acts on
those instances only; an application XID quarantines nothing and is recorded against the lease;
a lost GPU is quarantined; a DBE count that rose while the agent was stopped is found at start.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import config_as_dict, load_config, parse_config, to_toml
from agent.sim.node import init_sim_node
from tests.leases.conftest import cgroup_parents  # noqa: F401 - the fixture
from tests.leases.helpers import any_tenant_cgroup, grant, layout_clean, lease_state
from tests.link.support import wait_for
from tests.support import RunningAgent, probe, running_agent, wait_all_clean


@pytest.fixture
def agent(tmp_path: Path, cgroup_parents: dict[str, Path]) -> Iterator[RunningAgent]:  # noqa: F811
    node = init_sim_node(
        tmp_path / "node", "h100x2", cgroup_parents=list(cgroup_parents.values()),
        slice_bytes=1 << 20,
    )  # fmt: skip
    document = config_as_dict(load_config(node.config_path))
    document["health"].update({"poll_interval_s": 0.5})
    node.config_path.write_text(to_toml(parse_config(document)))
    with running_agent(node) as running:
        yield running


def inject(agent: RunningAgent, *args: str) -> None:
    result = agent.cli("sim", "inject", *args)
    assert result.returncode == 0, result.stderr


def health(agent: RunningAgent) -> dict[str, Any]:
    result = agent.cli("health", "--json")
    assert result.returncode in (0, 1), result.stderr
    import json  # noqa: PLC0415

    return json.loads(result.stdout)  # type: ignore[no-any-return]


def journal(agent: RunningAgent, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(agent.config.node.store_path, timeout=30)) as db:
        return list(db.execute(sql, args))


def states(agent: RunningAgent) -> dict[str, tuple[int, str, bool]]:
    return {
        str(uuid): (int(gpu), str(state), bool(clean))
        for uuid, gpu, state, clean in journal(
            agent, "SELECT uuid, gpu_index, state, clean FROM partitions WHERE present = 1"
        )
    }


def instances(agent: RunningAgent, gpu: int) -> dict[str, tuple[int, int]]:
    """Partition UUID -> (GI, CI) of GPU ``gpu``'s MIG instances."""
    status = agent.cli_json("status")
    found = next(g for g in status["gpus"] if g["index"] == gpu)
    return {i["uuid"]: (i["gpu_instance_id"], i["compute_instance_id"]) for i in found["instances"]}


def test_a_reset_class_xid_quarantines_its_gpu_and_fences_the_tenant_out(
    agent: RunningAgent,
    cgroup_parents: dict[str, Path],  # noqa: F811
) -> None:
    layout_clean(agent, "3g.40gb=2", gpu=0)
    layout_clean(agent, "3g.40gb=1", gpu=1)
    cgroup = any_tenant_cgroup(cgroup_parents, "alice")
    lease = grant(agent, "alice", cgroup, profile="3g.40gb")
    gpu = lease["partition"]["gpu_index"]
    nodes = lease["partition"]["device_nodes"]
    assert set(probe(cgroup, nodes).values()) == {errno.ENXIO}
    other_gpu = 1 - gpu

    inject(agent, "xid", "--gpu", str(gpu), "--xid", "79")

    def quarantined() -> dict[str, tuple[int, str, bool]] | None:
        now = states(agent)
        on_gpu = [s for s in now.values() if s[0] == gpu]
        return now if on_gpu and all(s[1] == "quarantined" for s in on_gpu) else None

    now = wait_for(quarantined, f"GPU {gpu}'s partitions quarantined")
    assert all(s[1] == "free" and s[2] for s in now.values() if s[0] == other_gpu)
    wait_for(lambda: lease_state(agent, lease["lease"]["id"])["state"] == "lost", "lease lost")
    wait_for(lambda: set(probe(cgroup, nodes).values()) == {errno.EPERM}, "the tenant fenced out")
    report = health(agent)
    by_index = {g["index"]: g for g in report["gpus"]}
    assert by_index[gpu]["state"] == "failed" and by_index[gpu]["reset_required"] is True
    assert by_index[other_gpu]["state"] == "healthy"
    assert [e["code"] for e in by_index[gpu]["events"]] == [79]
    assert by_index[gpu]["events"][0]["action"] == "quarantine_gpu"
    held = {h["partition_uuid"] for h in report["holds"]}
    assert held == {u for u, s in now.items() if s[0] == gpu}
    assert journal(agent, "SELECT kind, code, action FROM health_events") == [
        ("xid", 79, "quarantine_gpu")
    ]

    # A restart lifts nothing.
    agent.stop()
    agent.start()
    assert all(s[1] == "quarantined" for s in states(agent).values() if s[0] == gpu)
    assert {h["partition_uuid"] for h in health(agent)["holds"]} == held
    # Only the operator does: `partition clear`, then a verified scrub.
    for uuid in held:
        cleared = agent.cli_json("partition", "clear", uuid, "--reason", "GPU reset done")
        assert cleared["clean"] is True and cleared["state"] == "free"
    assert health(agent)["holds"] == []
    wait_for(lambda: {g["index"]: g for g in health(agent)["gpus"]}[gpu]["state"] == "healthy",
             "the GPU healthy again once every partition was cleared")  # fmt: skip


def test_attributed_xids_act_on_their_instances_only(agent: RunningAgent) -> None:
    layout_clean(agent, "2g.20gb=3", gpu=0)
    layout_clean(agent, "3g.40gb=1", gpu=1)
    mig = instances(agent, 0)
    assert len(mig) == 3
    hit = sorted(mig)[:2]
    spared = sorted(mig)[2]
    # Two instances of one GPU hit at once (XID 154 is not an application restart and does not
    # need a GPU reset: instance scope).
    for uuid in hit:
        gi, ci = mig[uuid]
        inject(agent, "xid", "--gpu", "0", "--xid", "154", "--gi", str(gi), "--ci", str(ci))

    def both() -> bool:
        now = states(agent)
        return all(now[uuid][1] == "quarantined" for uuid in hit)

    wait_for(both, "both attributed instances quarantined")
    now = states(agent)
    assert now[spared][1] == "free" and now[spared][2]
    assert all(s[1] == "free" for u, s in now.items() if s[0] == 1)
    events = {g["index"]: g for g in health(agent)["gpus"]}[0]["events"]
    assert {e["action"] for e in events} == {"quarantine_instance"}
    assert sorted(p for e in events for p in e["partitions"]) == hit
    assert {g["index"]: g for g in health(agent)["gpus"]}[0]["reset_required"] is False


def test_an_application_xid_is_recorded_against_the_lease_only(
    agent: RunningAgent,
    cgroup_parents: dict[str, Path],  # noqa: F811
) -> None:
    layout_clean(agent, "3g.40gb=2", gpu=0)
    cgroup = any_tenant_cgroup(cgroup_parents, "bob")
    lease = grant(agent, "bob", cgroup, partition=sorted(instances(agent, 0))[0])
    gi, ci = instances(agent, 0)[lease["partition"]["uuid"]]
    inject(agent, "xid", "--gpu", "0", "--xid", "13", "--gi", str(gi), "--ci", str(ci))

    def recorded() -> list[dict[str, Any]] | None:
        events = {g["index"]: g for g in health(agent)["gpus"]}[0]["events"]
        return events or None

    [event] = wait_for(recorded, "the application XID recorded")
    assert event["action"] == "lease_event" and event["code"] == 13
    assert event["partitions"] == [lease["partition"]["uuid"]]
    assert lease_state(agent, lease["lease"]["id"])["state"] == "active"
    assert all(s[1] != "quarantined" for s in states(agent).values())
    assert health(agent)["holds"] == []
    assert "lease_health_event" in agent.log() and lease["lease"]["id"] in agent.log()


def test_a_lost_gpu_is_quarantined(agent: RunningAgent) -> None:
    layout_clean(agent, "3g.40gb=1", gpu=1)
    inject(agent, "lost", "--gpu", "1")

    def lost() -> dict[str, Any] | None:
        gpu = {g["index"]: g for g in health(agent)["gpus"]}[1]
        return gpu if gpu["state"] == "lost" else None

    gpu = wait_for(lost, "GPU 1 reported lost")
    assert gpu["reset_required"] is True
    # Present or not (the inventory leaves a lost GPU out), GPU 1's partitions are quarantined.
    gpu1 = journal(agent, "SELECT state FROM partitions WHERE gpu_index = 1")
    assert gpu1 and {state for (state,) in gpu1} == {"quarantined"}
    # The rest of the node is still managed: the inventory reads the GPUs that answer.
    assert {p["gpu_index"] for p in agent.cli_json("partition", "list")["partitions"]} <= {0}
    assert agent.cli("status").returncode == 0
    kinds = {
        (kind, action) for kind, action in journal(agent, "SELECT kind, action FROM health_events")
    }
    assert ("lost", "quarantine_gpu") in kinds or ("xid", "quarantine_gpu") in kinds


def test_a_dbe_while_the_agent_was_stopped_is_found_at_start(agent: RunningAgent) -> None:
    layout_clean(agent, "3g.40gb=2", gpu=0)
    wait_all_clean(agent)
    agent.stop()
    inject(agent, "ecc", "--gpu", "0", "--dbe", "2")
    agent.start()
    # Found before the agent answers anything: the start-up check runs before the admin socket.
    assert all(s[1] == "quarantined" for s in states(agent).values() if s[0] == 0)
    [(kind, code, detail)] = journal(agent, "SELECT kind, code, detail FROM health_events")
    assert (kind, code) == ("ecc_dbe", 2)
    assert "while the agent was not running" in detail
