"""Hardware and kernel changed behind the agent's back end in revoke + quarantine, never in clean.

Each test reproduces one observation of the fail-closed issue on a simulated node, with real
cgroups: the kernel (ENXIO = allowed, EPERM = denied) is the judge of every fence.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.isolation import fence_for
from agent.isolation.rules import DeviceRule
from agent.runtime.failpoints import ENVIRONMENT_VARIABLE, Fault
from agent.sim.node import init_sim_node
from tests.leases.helpers import (
    behind_our_back,
    grant,
    hold,
    holding,
    layout_clean,
    lease_state,
    reap,
    tenant_cgroup,
)
from tests.support import (
    REPO,
    RunningAgent,
    all_gpu_nodes,
    probe,
    running_agent,
    wait_all_clean,
)

# Faults this module exercises (tests/foundation/test_failpoints.py).
COVERED = frozenset([Fault.GRANT_CGROUP_REMOVED])


@pytest.fixture
def node_agent(
    tmp_path: Path, cgroup_parents: dict[str, Path], request: pytest.FixtureRequest
) -> Any:
    mig = getattr(request, "param", True)
    node = init_sim_node(
        tmp_path / "node", "h100x2", cgroup_parents=list(cgroup_parents.values()),
        mig_enabled=mig, slice_bytes=1 << 20,
    )  # fmt: skip
    with running_agent(node) as running:
        yield running


def test_instance_destroyed_and_recreated_under_a_lease(
    node_agent: RunningAgent, cgroup_parents: dict[str, Path], hierarchy: str
) -> None:
    agent = node_agent
    layout_clean(agent, "4g.40gb=1")
    alice_cgroup = tenant_cgroup(cgroup_parents, hierarchy, "alice")
    alice = grant(agent, "alice", alice_cgroup, profile="4g.40gb")
    old_nodes = alice["partition"]["device_nodes"]
    assert set(probe(alice_cgroup, old_nodes).values()) == {errno.ENXIO}
    gi = next(
        i["gpu_instance_id"]
        for g in agent.cli_json("status")["gpus"]
        for i in g["instances"]
        if i["uuid"] == alice["partition"]["uuid"]
    )

    behind_our_back(agent, "destroy", "0", str(gi))
    # The next refresh (any status call) finds it gone: the lease is lost, at once.
    agent.cli_json("status")
    lost = lease_state(agent, alice["lease"]["id"])
    assert lost["state"] == "lost", lost
    assert "lease_lost" in agent.log()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if set(probe(alice_cgroup, all_gpu_nodes(agent.node.root / "dev")).values()) == {
            errno.EPERM
        }:
            break
        time.sleep(0.1)
    assert set(probe(alice_cgroup, all_gpu_nodes(agent.node.root / "dev")).values()) == {
        errno.EPERM
    }

    # The layout recreates an instance with the same GI id (so the same capability nodes) for bob.
    layout_clean(agent, "4g.40gb=1")
    bob_cgroup = tenant_cgroup(cgroup_parents, hierarchy, "bob")
    bob = grant(agent, "bob", bob_cgroup, profile="4g.40gb")
    assert bob["partition"]["uuid"] != alice["partition"]["uuid"]
    assert set(probe(bob_cgroup, bob["partition"]["device_nodes"]).values()) == {errno.ENXIO}
    assert set(probe(alice_cgroup, bob["partition"]["device_nodes"]).values()) == {errno.EPERM}

    # Releasing alice's lost lease answers its recorded outcome: quarantined, exit 3, not stuck.
    released = agent.cli("lease", "release", alice["lease"]["id"])
    assert released.returncode == 3, (released.stdout, released.stderr)
    assert "quarantined" in released.stdout
    assert lease_state(agent, alice["lease"]["id"])["state"] == "lost"


@pytest.mark.parametrize("node_agent", [False], indirect=True)
def test_mig_turned_on_and_off_again_leaves_no_stale_clean_whole_gpu(
    node_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    agent = node_agent
    wait_all_clean(agent)
    # The operator turns MIG on for GPU 0 (a reset makes it current) and lays out instances.
    agent.cli_json("layout", "apply", "--gpu", "0", "--mig", "on", "--clear")
    assert agent.cli("sim", "reset-gpu", "--gpu", "0").returncode == 0
    layout_clean(agent, "3g.40gb=2")
    alice_cgroup = tenant_cgroup(cgroup_parents, "v2" if "v2" in cgroup_parents else "v1", "alice")
    alice = grant(agent, "alice", alice_cgroup, profile="3g.40gb")
    written = agent.cli("sim", "write", "--partition", alice["partition"]["uuid"], "--pattern",
                        "alice-secret")  # fmt: skip
    assert written.returncode == 0, written.stderr

    # Behind the agent's back (nvidia-smi mig -dci -dgi; nvidia-smi -mig 0; reset): the
    # instances go, MIG goes off, and the whole GPU comes back.
    for gpu in agent.cli_json("status")["gpus"]:
        if gpu["index"] == 0:
            for instance in gpu["instances"]:
                behind_our_back(agent, "destroy", "0", str(instance["gpu_instance_id"]))
    behind_our_back(agent, "mig", "0", "off")
    assert agent.cli("sim", "reset-gpu", "--gpu", "0").returncode == 0
    agent.cli_json("status")
    assert lease_state(agent, alice["lease"]["id"])["state"] == "lost"
    partitions = wait_all_clean(agent)
    whole = next(p for p in partitions if p["kind"] == "gpu" and p["gpu_index"] == 0)
    bob_cgroup = tenant_cgroup(cgroup_parents, "v2" if "v2" in cgroup_parents else "v1", "bob")
    bob = grant(agent, "bob", bob_cgroup, partition=whole["uuid"])
    found = agent.cli_json("sim", "read", "--partition", bob["partition"]["uuid"], "--find",
                           "alice-secret")  # fmt: skip
    assert found["count"] == 0, found
    dev = agent.node.root / "dev"
    assert probe(alice_cgroup, [str(dev / "nvidia0")])[str(dev / "nvidia0")] == errno.EPERM
    certificates = agent.cli_json("scrub", "certs", "--partition", whole["uuid"])["certificates"]
    assert certificates and certificates[-1]["payload"]["verified"] is True


@pytest.mark.parametrize("node_agent", [False], indirect=True)
def test_grant_refused_while_mig_mode_pending_and_mode_change_refused_under_lease(
    node_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    agent = node_agent
    wait_all_clean(agent)
    cgroup = tenant_cgroup(cgroup_parents, "v2" if "v2" in cgroup_parents else "v1", "whole")
    lease = grant(agent, "whole", cgroup, profile="gpu")
    # MIG on for the GPU leased whole: refused, the lease and its fence are untouched.
    gpu = lease["partition"]["gpu_index"]
    refused = agent.cli("layout", "apply", "--gpu", str(gpu), "--mig", "on", "--clear")
    assert refused.returncode == 2, refused.stdout
    assert f"GPU {gpu}" in refused.stderr and lease["lease"]["id"] in refused.stderr
    assert lease_state(agent, lease["lease"]["id"])["state"] == "active"
    # The other GPU gets a pending mode change: its whole-GPU partition is not granted until reset.
    other = 1 - gpu
    agent.cli_json("layout", "apply", "--gpu", str(other), "--mig", "on", "--clear")
    pending = agent.cli("lease", "grant", "--tenant", "p", "--profile", "gpu", "--cgroup",
                        str(tenant_cgroup(cgroup_parents, "v2" if "v2" in cgroup_parents else "v1",
                                          "pending")))  # fmt: skip
    assert pending.returncode == 2, pending.stdout
    assert "pending MIG mode" in pending.stderr


def test_nested_tenant_cgroups_are_refused(
    node_agent: RunningAgent, cgroup_parents: dict[str, Path], hierarchy: str
) -> None:
    agent = node_agent
    layout_clean(agent, "1g.10gb=3")
    outer = tenant_cgroup(cgroup_parents, hierarchy, "outer")
    inner = outer / "inner"
    inner.mkdir()
    # bob first, inside; alice's grant around him is refused (and the reverse, on v2, too).
    bob = grant(agent, "bob", inner, profile="1g.10gb")
    before = agent.cli_json("partition", "list")["partitions"]
    refused = agent.cli("lease", "grant", "--tenant", "alice", "--profile", "1g.10gb", "--cgroup",
                        str(outer))  # fmt: skip
    assert refused.returncode == 2, refused.stdout
    assert "nest" in refused.stderr
    assert agent.cli_json("partition", "list")["partitions"] == before
    agent.cli_json("lease", "release", bob["lease"]["id"])
    if hierarchy == "v2":
        alice = grant(agent, "alice", outer, profile="1g.10gb")
        deeper = inner / "deeper"
        deeper.mkdir()
        refused = agent.cli("lease", "grant", "--tenant", "bob", "--profile", "1g.10gb",
                            "--cgroup", str(deeper))  # fmt: skip
        assert refused.returncode == 2 and "nest" in refused.stderr
        assert lease_state(agent, alice["lease"]["id"])["state"] == "active"


def test_v1_cgroup_with_children_is_refused_and_partition_stays_clean(
    node_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    if "v1" not in cgroup_parents:
        pytest.skip("no cgroup v1 devices hierarchy on this machine")
    agent = node_agent
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=1")
    [clean] = wait_all_clean(agent)
    parent = tenant_cgroup(cgroup_parents, "v1", "parent")
    (parent / "child").mkdir()
    refused = agent.cli("lease", "grant", "--tenant", "t", "--profile", "1g.10gb", "--cgroup",
                        str(parent))  # fmt: skip
    assert refused.returncode == 2 and "child cgroups" in refused.stderr
    [after] = agent.cli_json("partition", "list")["partitions"]
    assert after == clean


def test_second_agent_on_the_same_state_dir_is_refused(node_agent: RunningAgent) -> None:
    agent = node_agent
    second = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(agent.config_path), "agent"],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )  # fmt: skip
    assert second.returncode == 1
    assert "another accelguard agent" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    # The first agent's socket survived and it still answers.
    assert agent.config.admin.socket.is_socket()
    assert agent.cli_json("status")["node_id"]


def test_ttl_nan_and_infinite_are_refused(
    node_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    agent = node_agent
    layout_clean(agent, "1g.10gb=1")
    cgroup = tenant_cgroup(cgroup_parents, "v2" if "v2" in cgroup_parents else "v1", "nan")
    for ttl in ("nan", "inf", "-1"):
        result = agent.cli("lease", "grant", "--tenant", "t", "--profile", "1g.10gb", "--cgroup",
                           str(cgroup), "--ttl", ttl)  # fmt: skip
        assert result.returncode == 2, (ttl, result.stdout)
        assert "ttl" in result.stderr
    assert agent.cli_json("lease", "list")["leases"] == []


def test_exit_codes_of_the_scripting_contract(
    node_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    agent = node_agent
    cgroup = tenant_cgroup(cgroup_parents, "v2" if "v2" in cgroup_parents else "v1", "codes")
    assert agent.cli("lease", "release", "lease-0000000000000000").returncode == 4
    assert agent.cli("partition", "clear", "MIG-nope", "--reason", "x").returncode == 4
    # Fresh instances are dirty until scrubbed: "retry later" (75), and --wait gets one.
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=1")
    waited = agent.cli("lease", "grant", "--tenant", "t", "--profile", "1g.10gb", "--cgroup",
                       str(cgroup), "--wait", "30", "--json")  # fmt: skip
    assert waited.returncode == 0, waited.stderr
    lease = json.loads(waited.stdout)
    busy = agent.cli("lease", "grant", "--tenant", "u", "--profile", "1g.10gb", "--cgroup",
                     str(cgroup))  # fmt: skip
    assert busy.returncode == 75, busy.stderr
    assert agent.cli("lease", "release", lease["lease"]["id"]).returncode == 0
    # layout apply --wait returns once the new partitions are clean.
    applied = agent.cli("layout", "apply", "--gpu", "1", "2g.20gb=2", "--wait", "60")
    assert applied.returncode == 0, applied.stderr
    assert all(
        p["state"] == "free" and p["clean"]
        for p in agent.cli_json("partition", "list")["partitions"]
        if p["gpu_index"] == 1
    )


def test_orphan_fence_is_reported_and_blocks_the_grant(
    node_agent: RunningAgent, cgroup_parents: dict[str, Path], hierarchy: str
) -> None:
    """A fence nobody in the journal explains: its partitions quarantined, never granted."""
    agent = node_agent
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=1")
    [clean] = wait_all_clean(agent)
    stranger = tenant_cgroup(cgroup_parents, hierarchy, "stranger")
    nodes = clean["device_nodes"]
    rules = []
    for path in nodes:
        rdev = Path(path).stat().st_rdev
        rules.append(DeviceRule("c", os.major(rdev), os.minor(rdev), frozenset("rw")))
    fence_for(stranger).apply(stranger, rules)
    agent.stop()
    agent.start()
    [found] = agent.cli_json("partition", "list")["partitions"]
    assert found["state"] == "quarantined", found
    assert str(stranger) in found["reason"]
    assert "unexplained_fence" in agent.log()
    # Cleared (scrubbed) by the operator, it is still not granted while the stranger can open it.
    cleared = agent.cli_json("partition", "clear", found["uuid"], "--reason", "checked")
    assert cleared["clean"] is True
    tenant = tenant_cgroup(cgroup_parents, hierarchy, "tenant")
    refused = agent.cli("lease", "grant", "--tenant", "t", "--partition", found["uuid"],
                        "--cgroup", str(tenant))  # fmt: skip
    assert refused.returncode != 0 and str(stranger) in refused.stderr
    assert agent.cli_json("lease", "list")["leases"] == []
    [still] = agent.cli_json("partition", "list")["partitions"]
    assert still["state"] == "free" and still["holder"] == ""


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_lost_journal_is_never_a_fresh_start(
    node_agent: RunningAgent, cgroup_parents: dict[str, Path], damage: str
) -> None:
    agent = node_agent
    layout_clean(agent, "1g.10gb=2")
    cgroup = tenant_cgroup(cgroup_parents, "v2" if "v2" in cgroup_parents else "v1", "old")
    old = grant(agent, "old", cgroup, profile="1g.10gb")
    agent.stop()
    journal = agent.config.node.store_path
    for suffix in ("", "-wal", "-shm"):
        path = journal.with_name(journal.name + suffix)
        if damage == "truncate" and path.exists():
            path.write_bytes(b"")
        else:
            path.unlink(missing_ok=True)
    agent.start()
    # No lease known, and no partition free: every one quarantined until scrubbed.
    assert agent.cli_json("lease", "list", "--all")["leases"] == []
    partitions = agent.cli_json("partition", "list")["partitions"]
    assert partitions and all(p["state"] == "quarantined" for p in partitions), partitions
    assert all("journal lost" in p["reason"] for p in partitions)
    # The old tenant's fence is still in the kernel: found and reported, and it still restricts.
    assert "unexplained_fence" in agent.log() and str(cgroup) in agent.log()
    assert set(probe(cgroup, old["partition"]["device_nodes"]).values()) == {errno.ENXIO}
    other = next(p for p in partitions if p["uuid"] != old["partition"]["uuid"])
    probed = probe(cgroup, other["device_nodes"])
    assert errno.EPERM in probed.values()
    # Nothing can be granted until an operator clears (scrubs) a partition.
    new_tenant = tenant_cgroup(cgroup_parents, "v2" if "v2" in cgroup_parents else "v1", "new")
    refused = agent.cli("lease", "grant", "--tenant", "new", "--partition",
                        old["partition"]["uuid"], "--cgroup", str(new_tenant))  # fmt: skip
    assert refused.returncode != 0


def test_a_lost_journal_marks_where_the_replay_cache_begins(node_agent: RunningAgent) -> None:
    """The replay cache of remote commands goes with a lost journal: the new one records when it
    began (agent/store/commands.py refuses unknown commands issued before). A first start has
    no such mark."""
    agent = node_agent
    journal = agent.config.node.store_path

    def mark() -> str | None:
        with contextlib.closing(sqlite3.connect(journal)) as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'journal_lost_at'").fetchone()
        return None if row is None else str(row[0])

    agent.stop()
    assert mark() is None
    for suffix in ("", "-wal", "-shm"):
        journal.with_name(journal.name + suffix).unlink(missing_ok=True)
    before = time.time()
    agent.start()
    agent.stop()
    lost_at = mark()
    assert lost_at is not None and float(lost_at) >= before


def test_corrupt_journal_is_refused_then_recovered(
    node_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    agent = node_agent
    layout_clean(agent, "1g.10gb=7")
    agent.stop()
    journal = agent.config.node.store_path
    data = bytearray(journal.read_bytes())
    assert len(data) > 3 * 4096, len(data)
    data[2 * 4096 : 2 * 4096 + 1024] = bytes(range(256)) * 4
    journal.write_bytes(bytes(data))
    started = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(agent.config_path), "agent"],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )  # fmt: skip
    assert started.returncode != 0
    assert "corrupt" in started.stderr and "state recover" in started.stderr
    assert len(started.stderr.strip().splitlines()) == 1, started.stderr
    recovered = agent.cli("state", "recover")
    assert recovered.returncode == 0, recovered.stderr
    assert list(journal.parent.glob(f"{journal.name}.damaged-*"))
    agent.start()
    partitions = agent.cli_json("partition", "list")["partitions"]
    assert len(partitions) == 7
    assert all(p["state"] == "quarantined" for p in partitions), partitions
    # While the agent runs, recovery refuses to touch its journal.
    busy = agent.cli("state", "recover")
    assert busy.returncode == 1 and "another accelguard agent" in busy.stderr


def test_expiry_is_not_delayed_by_a_long_scrub(
    tmp_path: Path, cgroup_parents: dict[str, Path]
) -> None:
    node = init_sim_node(
        tmp_path / "node", "h100x2", cgroup_parents=list(cgroup_parents.values()),
        slice_bytes=1 << 20,
    )  # fmt: skip
    toml = node.config_path.read_text().replace("deadline_s = 60.0", "deadline_s = 20.0")
    node.config_path.write_text(toml)
    with running_agent(node) as agent:
        agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=2")
        wait_all_clean(agent)
        agent.stop()
        # Every scrub from now on hangs until its 20 s deadline.
        agent.start(env={"ACCELGUARD_FAILPOINTS": "scrub.worker_hang"})
        hierarchy = "v2" if "v2" in cgroup_parents else "v1"
        first = grant(agent, "slow", tenant_cgroup(cgroup_parents, hierarchy, "slow"),
                      profile="1g.10gb")  # fmt: skip
        releasing = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "--config", str(agent.config_path), "lease",
             "release", first["lease"]["id"]],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            cgroup = tenant_cgroup(cgroup_parents, hierarchy, "short")
            ttl = 3.0
            granted_at = time.time()
            short = agent.cli_json("lease", "grant", "--tenant", "short", "--profile", "1g.10gb",
                                   "--cgroup", str(cgroup), "--ttl", str(ttl))  # fmt: skip
            nodes = short["partition"]["device_nodes"]
            # Ordering, not speed: the expiry's revocation must come while the first
            # partition's scrub still hangs (its deadline is 20 s after it started).
            revoked = False
            while not revoked and releasing.poll() is None and time.time() < granted_at + 30:
                revoked = set(probe(cgroup, nodes).values()) == {errno.EPERM}
                time.sleep(0.1)
            assert revoked, "the expired lease's fence was never revoked"
            assert releasing.poll() is None, "expiry waited for the slow scrub to end"
            assert lease_state(agent, short["lease"]["id"])["state"] != "active"
        finally:
            releasing.kill()
            releasing.wait()


def test_release_interrupted_by_a_full_disk_completes_when_space_returns(
    tmp_path: Path, cgroup_parents: dict[str, Path]
) -> None:
    node = init_sim_node(
        tmp_path / "node", "h100x2", cgroup_parents=list(cgroup_parents.values()),
        slice_bytes=1 << 20,
    )  # fmt: skip
    state = node.root / "state"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(state)], check=True)
    try:
        with running_agent(node) as agent:
            agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=1")
            wait_all_clean(agent)
            cgroup = tenant_cgroup(cgroup_parents, "v2" if "v2" in cgroup_parents else "v1", "f")
            lease = grant(agent, "full", cgroup, profile="1g.10gb")
            filler = state / "filler"
            with filler.open("wb") as out:
                try:
                    while True:
                        out.write(b"\0" * 65536)
                        out.flush()
                except OSError:
                    pass
            failed = agent.cli("lease", "release", lease["lease"]["id"])
            assert failed.returncode == 75, (failed.stdout, failed.stderr)
            assert "retries it" in failed.stderr
            filler.unlink()
            # The agent finishes the release on its own; a second release joins and answers it.
            again = agent.cli("lease", "release", lease["lease"]["id"], "--json")
            assert again.returncode == 0, again.stderr
            assert json.loads(again.stdout)["clean"] is True
            assert lease_state(agent, lease["lease"]["id"])["state"] == "released"
            assert set(probe(cgroup, lease["partition"]["device_nodes"]).values()) == {errno.EPERM}
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def test_clear_evicts_or_refuses_before_it_scrubs(node_agent: RunningAgent) -> None:
    """A quarantined partition may still have holders (an orphan fence's tenant, one from before
    a lost journal): `partition clear` evicts the ones NVML reports and refuses while a stranger
    holds the partition's own nodes, never scrubbing under a holder."""
    agent = node_agent
    [clean] = layout_clean(agent, "1g.10gb=1")
    uuid = clean["uuid"]
    agent.cli_json("partition", "quarantine", uuid, "--reason", "suspect")
    user = hold(agent, uuid)  # outside any cgroup, registered with NVML on the instance
    cleared = agent.cli_json("partition", "clear", uuid, "--reason", "checked")
    assert cleared["state"] == "free" and cleared["clean"] is True, cleared
    assert reap(user) < 0  # evicted, not exited on its own
    agent.cli_json("partition", "quarantine", uuid, "--reason", "suspect again")
    caps = [p for p in clean["device_nodes"] if "nvidia-caps" in p]
    with holding([Path(p) for p in caps]) as stranger:
        refused = agent.cli("partition", "clear", uuid, "--reason", "checked")
        assert refused.returncode == 3, (refused.stdout, refused.stderr)
        [still] = agent.cli_json("partition", "list")["partitions"]
        assert still["state"] == "quarantined" and "clear refused" in still["reason"]
        assert stranger.poll() is None  # not NVML's: left alone, and the clear refused


def test_a_grant_whose_cgroup_vanishes_before_its_fence_fails(
    tmp_path: Path, cgroup_parents: dict[str, Path]
) -> None:
    """The tenant's cgroup removed between the grant's journal record and its fence (as a job's
    end removes it): the grant fails instead of answering with a lease that no fence stands
    behind, and the partition comes back through a scrub."""
    node = init_sim_node(
        tmp_path / "node", "h100x1", cgroup_parents=list(cgroup_parents.values()),
        slice_bytes=1 << 20,
    )  # fmt: skip
    with running_agent(node) as agent:
        agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=1")
        wait_all_clean(agent)
        agent.stop()
        agent.start(env={ENVIRONMENT_VARIABLE: Fault.GRANT_CGROUP_REMOVED})
        cgroup = tenant_cgroup(cgroup_parents, "v2" if "v2" in cgroup_parents else "v1", "gone")
        result = agent.cli(
            "lease", "grant", "--tenant", "gone", "--profile", "1g.10gb", "--cgroup", str(cgroup)
        )
        assert result.returncode != 0, result.stdout
        assert "vanished before it was fenced" in result.stderr, result.stderr
        assert not cgroup.exists()
        assert [lease["state"] for lease in agent.cli_json("lease", "list")["leases"]] == []
        wait_all_clean(agent)
