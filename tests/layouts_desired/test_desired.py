"""The desired layout: recorded by every apply, shown and forgotten, asserted without arguments,
and re-applied at start-up with the apply's rules (keep what fits, never touch a lease, never
reset a GPU), including after a crash in the middle of the apply that recorded it."""

from __future__ import annotations

import json
import shutil
import signal
from collections import Counter
from pathlib import Path

import pytest

import agent.store.layouts as desired_layouts
from agent.runtime.failpoints import ENVIRONMENT_VARIABLE
from agent.store import Store
from agent.store.layouts import DesiredLayout
from tests.layouts_desired.conftest import (
    configure_layout,
    desired,
    instances,
    outside,
    profiles,
    restart,
    start_up_outcomes,
)
from tests.leases.helpers import any_tenant_cgroup, grant, lease_state, partition
from tests.support import RunningAgent, wait_all_clean

GONE_UUID = "GPU-00000000-0000-0000-0000-00000000dead"


def _record_behind(agent: RunningAgent, *layouts: DesiredLayout) -> None:
    """A desired layout in the journal of the stopped agent, as an earlier apply (or a restored
    backup) would have left it."""
    store = Store(agent.config.node.store_path)
    try:
        desired_layouts.record(store, layouts, "test")
    finally:
        store.close()


def test_no_desired_layout_yet(agent: RunningAgent) -> None:
    shown = agent.cli("layout", "desired")
    assert shown.returncode == 0 and shown.stdout == ""
    assert "no desired layout" in shown.stderr
    assert agent.cli_json("layout", "desired")["gpus"] == []
    asserted = agent.cli("layout", "assert")
    assert asserted.returncode == 2
    assert "no desired layout is recorded" in asserted.stderr
    # A plan records nothing; a refused apply neither.
    agent.cli_json("layout", "plan", "--gpu", "0", "1g.10gb=1")
    assert agent.cli("layout", "apply", "--gpu", "0", "5g.50gb=1").returncode == 2
    assert agent.cli_json("layout", "desired")["gpus"] == []


def test_every_apply_records_what_it_asked_for_per_gpu(agent: RunningAgent) -> None:
    agent.cli_json("layout", "apply", "--gpu", "all", "1g.10gb=2")
    agent.cli_json("layout", "apply", "--gpu", "1", "3g.40gb=1", "1g.10gb=1")
    shown = desired(agent)
    uuids = [g["uuid"] for g in agent.cli_json("status")["gpus"]]
    assert {i: (g["gpu_uuid"], g["counts"], g["outcome"]) for i, g in shown.items()} == {
        0: (uuids[0], {"1g.10gb": 2}, "applied"),
        1: (uuids[1], {"3g.40gb": 1, "1g.10gb": 1}, "applied"),
    }
    assert shown[0]["recorded_by"].startswith("admin uid 0")
    # Applying what the GPU already has records it again; it "matches".
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=2")
    assert desired(agent)[0]["outcome"] == "matches"
    text = agent.cli("layout", "desired").stdout
    assert f"GPU 0 {uuids[0]}: 1g.10gb=2" in text and "matches" in text
    assert agent.cli("layout", "assert").stdout.splitlines() == ["GPU 0: matches", "GPU 1: matches"]

    assert agent.cli("layout", "desired", "--forget").returncode == 2
    left = agent.cli_json("layout", "desired", "--forget", "--gpu", "1")
    assert [g["gpu_index"] for g in left["gpus"]] == [0]
    agent.cli_json("layout", "desired", "--forget", "--gpu", "all")
    assert agent.cli("layout", "assert").returncode == 2
    records = [r["action"] for r in agent.cli_json("audit", "show")["records"]]
    assert records.count("layout.desired") == 3
    assert records.count("layout.desired_forgotten") == 2


def test_start_up_restores_the_desired_layout_around_a_lease(
    tenant_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    agent = tenant_agent
    agent.cli_json("layout", "apply", "--gpu", "0", "3g.40gb=1", "1g.10gb=2")
    agent.cli_json("layout", "apply", "--gpu", "1", "7g.80gb=1")
    wait_all_clean(agent)
    cgroup = any_tenant_cgroup(cgroup_parents, "alice")
    lease = grant(agent, "alice", cgroup, profile="1g.10gb")
    leased = lease["partition"]["uuid"]
    free = [i for i in instances(agent, 0) if i["uuid"] != leased]
    agent.stop()
    # While the agent is down, someone else takes instances away (nvidia-smi, mig-parted).
    for instance in free:
        outside(agent, "destroy", "0", str(instance["gpu_instance_id"]))
    outside(agent, "destroy", "1", str(instances_of_stopped(agent, 1)[0]))
    agent.start()
    outcomes = start_up_outcomes(agent, 2)
    assert {e["gpu"]: e["outcome"] for e in outcomes.values()} == {0: "applied", 1: "applied"}
    assert profiles(agent, 0) == Counter({"3g.40gb": 1, "1g.10gb": 2})
    assert profiles(agent, 1) == Counter({"7g.80gb": 1})
    # The tenant's instance was kept, its lease never touched.
    assert leased in [i["uuid"] for i in instances(agent, 0)]
    assert lease_state(agent, lease["lease"]["id"])["state"] == "active"
    held = partition(agent, leased)
    assert held is not None and held["state"] == "leased"
    assert agent.cli("layout", "assert").returncode == 0
    # New instances are dirty until scrubbed, like any the agent did not know.
    wait_all_clean_but(agent, leased)

    # Matching already: a restart makes no mutating NVML call and changes nothing.
    before_calls, before = agent.mutating_calls(), instances(agent, 0)
    restart(agent)
    outcomes = start_up_outcomes(agent, 2)
    assert {e["outcome"] for e in outcomes.values()} == {"matches"}
    assert agent.mutating_calls() == before_calls
    assert instances(agent, 0) == before


def instances_of_stopped(agent: RunningAgent, gpu: int) -> list[int]:
    """GI ids of a GPU read straight from the journal of a stopped agent."""
    store = Store(agent.config.node.store_path)
    try:
        return [p.gi_id for p in store.partitions() if p.gpu_index == gpu and p.gi_id is not None]
    finally:
        store.close()


def wait_all_clean_but(agent: RunningAgent, leased: str) -> None:
    from tests.support import wait_until  # noqa: PLC0415

    def clean() -> bool:
        return all(
            p["uuid"] == leased or (p["state"] == "free" and p["clean"]) for p in agent.partitions()
        )

    wait_until(clean, "every partition but the leased one clean")


def test_a_lease_in_the_way_blocks_that_gpu_only_and_is_reported(
    tenant_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    agent = tenant_agent
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=2")
    agent.cli_json("layout", "apply", "--gpu", "1", "1g.10gb=1")
    wait_all_clean(agent)
    lease = grant(agent, "alice", any_tenant_cgroup(cgroup_parents, "alice"), profile="1g.10gb")
    leased = lease["partition"]["uuid"]
    status = agent.cli_json("status")
    assert leased in [i["uuid"] for i in status["gpus"][0]["instances"]]
    before = instances(agent, 0)
    agent.stop()
    # The journal wants a whole-GPU instance on GPU 0, which the lease stands in the way of,
    # and two more 1g.10gb on GPU 1, which nothing stands in the way of.
    _record_behind(
        agent,
        DesiredLayout(status["gpus"][0]["uuid"], 0, True, {"7g.80gb": 1}),
        DesiredLayout(status["gpus"][1]["uuid"], 1, True, {"1g.10gb": 3}),
    )
    agent.start()
    outcomes = start_up_outcomes(agent, 2)
    by_gpu = {e["gpu"]: e for e in outcomes.values()}
    assert by_gpu[0]["outcome"] == "blocked" and by_gpu[0]["level"] == "warning"
    assert lease["lease"]["id"] in by_gpu[0]["detail"] and "GPU 0" in by_gpu[0]["detail"]
    assert by_gpu[1]["outcome"] == "applied"
    assert instances(agent, 0) == before, "GPU 0 was changed under its lease"
    assert profiles(agent, 1) == Counter({"1g.10gb": 3})
    assert lease_state(agent, lease["lease"]["id"])["state"] == "active"
    shown = desired(agent)
    assert shown[0]["outcome"] == "blocked" and lease["lease"]["id"] in shown[0]["outcome_detail"]
    text = agent.cli("layout", "desired").stdout
    assert "blocked" in text and lease["lease"]["id"] in text
    asserted = agent.cli("layout", "assert")
    assert asserted.returncode == 2 and lease["lease"]["id"] in asserted.stderr


def test_a_pending_mig_mode_is_reported_never_reset(agent: RunningAgent) -> None:
    agent.cli_json("layout", "apply", "--gpu", "1", "--mig", "off")
    before_calls = agent.mutating_calls()
    restart(agent)
    [event] = start_up_outcomes(agent, 1).values()
    assert event["outcome"] == "waiting_for_reset" and "reset" in event["detail"]
    assert agent.mutating_calls() == before_calls
    assert agent.cli_json("status")["gpus"][1]["mig_mode"] == {"current": True, "pending": False}
    assert desired(agent)[1]["outcome"] == "waiting_for_reset"
    asserted = agent.cli("layout", "assert")
    assert asserted.returncode == 1 and "reset" in asserted.stdout
    # Someone turns MIG back on behind the agent's back: the desired mode is set again at the
    # next start (still no reset).
    agent.stop()
    outside(agent, "mode", "1", "on")
    agent.start()
    [event] = start_up_outcomes(agent, 1).values()
    assert event["outcome"] == "waiting_for_reset"
    assert agent.cli_json("status")["gpus"][1]["mig_mode"] == {"current": True, "pending": False}
    # The operator resets the GPU: the desired layout is in effect.
    assert agent.cli("sim", "reset-gpu", "--gpu", "1").returncode == 0
    restart(agent)
    [event] = start_up_outcomes(agent, 1).values()
    assert event["outcome"] == "matches"
    assert agent.cli("layout", "assert").returncode == 0


def test_a_gpu_that_is_gone_is_reported_not_an_error(agent: RunningAgent) -> None:
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=1")
    agent.stop()
    _record_behind(agent, DesiredLayout(GONE_UUID, 5, True, {"1g.10gb": 7}))
    agent.start()
    outcomes = start_up_outcomes(agent, 2)
    assert outcomes[GONE_UUID]["outcome"] == "gone"
    assert {e["outcome"] for u, e in outcomes.items() if u != GONE_UUID} == {"matches"}
    gone = next(g for g in agent.cli_json("layout", "desired")["gpus"] if not g["present"])
    assert (gone["gpu_uuid"], gone["gpu_index"], gone["outcome"]) == (GONE_UUID, 5, "gone")
    asserted = agent.cli("layout", "assert")
    assert asserted.returncode == 1
    assert asserted.stdout.splitlines() == [
        "GPU 0: matches",
        f"GPU {GONE_UUID}: differs",
        "  not on this node (GPU 5 when its desired layout was recorded)",
    ]
    as_json = json.loads(agent.cli("layout", "assert", "--json").stdout)
    assert as_json["matches"] is False
    assert as_json["gpus"][-1]["gpu_uuid"] == GONE_UUID
    agent.cli_json("layout", "desired", "--forget", "--gpu", GONE_UUID)
    assert agent.cli("layout", "assert").returncode == 0
    assert agent.cli("layout", "desired", "--forget", "--gpu", GONE_UUID).returncode == 4


def test_with_reapply_off_the_start_up_only_reports(agent: RunningAgent) -> None:
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=2")
    agent.stop()
    configure_layout(agent, reapply_at_start=False)
    [gi, _] = instances_of_stopped(agent, 0)
    outside(agent, "destroy", "0", str(gi))
    before_calls = agent.mutating_calls()
    agent.start()
    [event] = start_up_outcomes(agent, 1).values()
    assert event["outcome"] == "differs" and "create 1" in event["detail"]
    assert agent.mutating_calls() == before_calls
    assert profiles(agent, 0) == Counter({"1g.10gb": 1})
    assert agent.cli("layout", "assert").returncode == 1
    assert "reapply_at_start is off" in agent.cli("layout", "desired").stdout


CRASH_POINTS = ["layout.before_destroy", "layout.before_create", "layout.between_gi_and_ci"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_mid_apply_is_completed_at_start_up(agent: RunningAgent, point: str) -> None:
    """The desired layout is recorded before the first change: an apply the agent died in is
    still desired, and the next start completes it with no apply from anyone."""
    agent.cli_json("layout", "apply", "--gpu", "0", "3g.40gb=2")
    wait_all_clean(agent)
    restart(agent, env={ENVIRONMENT_VARIABLE: point})
    start_up_outcomes(agent, 1)
    died = agent.cli("layout", "apply", "--gpu", "0", "3g.40gb=1", "1g.10gb=3")
    assert died.returncode != 0, f"{point} was not reached"
    assert agent.wait_exit() == -signal.SIGKILL
    store = Store(agent.config.node.store_path)
    try:
        [row] = desired_layouts.desired_layouts(store)
    finally:
        store.close()
    assert (row.outcome, dict(row.counts)) == ("applying", {"3g.40gb": 1, "1g.10gb": 3})

    agent.start()
    [event] = start_up_outcomes(agent, 1).values()
    assert event["outcome"] == "applied"
    assert profiles(agent, 0) == Counter({"3g.40gb": 1, "1g.10gb": 3})
    assert all(i["uuid"].startswith("MIG-") for i in instances(agent, 0))
    assert agent.cli("layout", "assert").returncode == 0


def test_the_desired_layout_travels_in_a_state_backup(agent: RunningAgent, tmp_path: Path) -> None:
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=2")
    backup = tmp_path / "backup.agsb"
    exported = agent.cli("state", "export", str(backup))
    assert exported.returncode == 0, exported.stderr
    agent.cli_json("layout", "desired", "--forget", "--gpu", "all")
    agent.stop()
    [gi, _] = instances_of_stopped(agent, 0)
    outside(agent, "destroy", "0", str(gi))
    shutil.rmtree(agent.config.node.state_dir)
    imported = agent.cli("state", "import", str(backup))
    assert imported.returncode == 0, imported.stderr
    agent.start()
    [event] = start_up_outcomes(agent, 1).values()
    assert event["outcome"] == "applied"
    assert profiles(agent, 0) == Counter({"1g.10gb": 2})
    assert desired(agent)[0]["counts"] == {"1g.10gb": 2}
