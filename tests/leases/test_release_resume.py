"""A release cut short after its revoke (the lease already released, its scrub's result not yet
journaled) is finished by the agent on its own, and a later `lease release` answers with its
outcome, never with the partition stuck in "scrubbing" (found by the full-disk test under load:
the second release exited 3, scrubbing).

The journal is made to refuse writes exactly then: the test holds SQLite's write lock from the
moment the partition is scrubbing until the first release has given up (the agent waits
busy_timeout, 5 s, then fails the write with "database is locked", a transient StoreError).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

from agent.sim.node import init_sim_node
from tests.leases.helpers import grant, lease_state, tenant_cgroup
from tests.support import ACCELGUARD, REPO, running_agent, wait_all_clean


def _state(db: Path, uuid: str) -> str:
    reader = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = reader.execute("SELECT state FROM partitions WHERE uuid = ?", (uuid,)).fetchone()
    finally:
        reader.close()
    return str(row[0]) if row else ""


def test_a_scrub_cut_short_is_finished_by_the_agent(
    tmp_path: Path, cgroup_parents: dict[str, Path]
) -> None:
    # Large slices: the scrub takes long enough to be caught in the act.
    node = init_sim_node(
        tmp_path / "node", "h100x1", cgroup_parents=list(cgroup_parents.values()),
        slice_bytes=128 << 20,
    )  # fmt: skip
    with running_agent(node) as agent:
        agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=1")
        [partition] = wait_all_clean(agent, timeout=120)
        cgroup = tenant_cgroup(cgroup_parents, "v2" if "v2" in cgroup_parents else "v1", "r")
        lease = grant(agent, "cut", cgroup, partition=partition["uuid"])["lease"]["id"]
        db = node.root / "state" / "agent.db"
        release = subprocess.Popen(
            [*ACCELGUARD, "--config", str(agent.config_path), "lease", "release", lease],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip
        while _state(db, partition["uuid"]) != "scrubbing":
            assert release.poll() is None, release.communicate()
            time.sleep(0.005)
        writer = sqlite3.connect(db, timeout=5, isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")  # every write of the agent now waits, then fails
            out, err = release.communicate(timeout=120)
        finally:
            writer.execute("ROLLBACK")
            writer.close()
        assert release.returncode == 75, (out, err)
        assert "retries it on its own" in err
        assert lease_state(agent, lease)["state"] == "released"  # revoked before the cut
        # Nobody releases it again: the agent's scheduler finishes the scrub by itself.
        deadline = time.monotonic() + 120
        while _state(db, partition["uuid"]) != "free":
            assert time.monotonic() < deadline, _state(db, partition["uuid"])
            time.sleep(0.05)
        assert "lease_release_finished" in agent.log()

        again = agent.cli("lease", "release", lease, "--json")
        assert again.returncode == 0, again.stdout + again.stderr
        answer = json.loads(again.stdout)
        assert (answer["state"], answer["clean"]) == ("free", True)
        certificates = agent.cli_json("scrub", "certs", "--partition", partition["uuid"])
        after = [c for c in certificates["certificates"]
                 if c["payload"]["previous_lease_id"] == lease]  # fmt: skip
        assert len(after) == 1 and after[0]["payload"]["verified"] is True
        # Asked again: the recorded outcome, nothing scrubbed twice.
        assert agent.cli("lease", "release", lease).returncode == 0
        assert len(agent.cli_json("scrub", "certs", "--partition", partition["uuid"])[
            "certificates"]) == len(certificates["certificates"])  # fmt: skip
