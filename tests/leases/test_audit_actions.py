"""A running agent leaves exactly one audit record per action, naming who acted: the agent's
start and stop, admin calls (with the caller's uid and pid from the kernel), lease and partition
transitions, fences applied and revoked, evictions, scrub results with the certificate's digest,
layout changes, health faults; and the chain it leaves verifies (docs/audit.md)."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any

from agent.store.certificates import certificate_digest
from tests.leases.helpers import any_tenant_cgroup
from tests.link.support import wait_for
from tests.support import RunningAgent, wait_all_clean


def _records(agent: RunningAgent, *args: str) -> list[dict[str, Any]]:
    return list(agent.cli_json("audit", "show", *args)["records"])


def _one(records: list[dict[str, Any]], action: str, **fields: Any) -> dict[str, Any]:
    found = [
        r for r in records
        if r["action"] == action and all(r.get(k) == v for k, v in fields.items())
    ]  # fmt: skip
    assert len(found) == 1, (action, fields, found)
    return found[0]


def test_every_action_leaves_one_record_with_its_actor(
    lease_agent: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    agent = lease_agent
    wait_all_clean(agent)
    layout = agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=2")
    assert layout
    wait_all_clean(agent)
    cgroup = any_tenant_cgroup(cgroup_parents, "audit")
    grant = agent.cli_json("lease", "grant", "--tenant", "tess", "--profile", "1g.10gb",
                           "--cgroup", str(cgroup))  # fmt: skip
    lease_id, partition = grant["lease"]["id"], grant["partition"]["uuid"]
    agent.cli_json("lease", "release", lease_id)
    other = next(p["uuid"] for p in agent.partitions() if p["uuid"] != partition)
    agent.cli_json("partition", "quarantine", other, "--reason", "operator check")
    agent.cli("sim", "inject", "xid", "--gpu", "1", "--xid", "79")
    wait_for(lambda: any(r["action"] == "health.event" for r in _records(agent)),
             "the XID's health record")  # fmt: skip

    records = _records(agent)
    admin = [r for r in records if r["actor"]["kind"] == "admin"]
    assert admin and all(r["actor"]["uid"] == 0 and r["actor"]["pid"] > 0 for r in admin)
    calls = Counter(r["action"] for r in records if r["action"].startswith("admin."))
    assert calls == {"admin.ApplyLayout": 1, "admin.GrantLease": 1, "admin.ReleaseLease": 1,
                     "admin.QuarantinePartition": 1}  # fmt: skip
    assert all(r["outcome"] == "ok" for r in records if r["action"].startswith("admin."))
    # Reads leave no record.
    assert not any(r["action"] in ("admin.ListPartitions", "admin.GetStatus") for r in records)

    # The lease from its grant to its end, one record per transition, all naming the caller.
    of_lease = _records(agent, "--lease", lease_id)
    actions = [r["action"] for r in of_lease]
    for action in ("lease.granting", "lease.active", "lease.releasing", "lease.ended",
                   "eviction", "scrub.result"):  # fmt: skip
        assert actions.count(action) == 1, (action, actions)
    assert actions.index("lease.granting") < actions.index("lease.active")
    assert actions.index("lease.releasing") < actions.index("eviction")
    granting = _one(of_lease, "lease.granting")
    assert granting["actor"]["kind"] == "admin"
    assert granting["detail"]["tenant"] == "tess"
    assert granting["detail"]["cgroup"] == str(cgroup)
    assert _one(of_lease, "lease.ended")["outcome"] == "released"
    # The scrub's record names the certificate it signed.
    scrub = _one(of_lease, "scrub.result")
    assert scrub["outcome"] == "verified"
    certificate = agent.cli_json("scrub", "certs", "--partition", partition)["certificates"][-1]
    assert scrub["detail"]["certificate_sha256"] == certificate_digest(certificate)
    # The fence: applied at the grant, revoked at the release, each once for this cgroup.
    fences = [r for r in records if r["action"].startswith("fence.")
              and r["detail"]["cgroup"] == str(cgroup)]  # fmt: skip
    assert [r["action"] for r in fences] == ["fence.applied", "fence.revoked"]
    assert fences[0]["detail"]["allowed"]
    # Layout: started and finished once each; the partition quarantined by the operator;
    # the XID: one health record, and GPU 1's partitions quarantined by the agent.
    assert Counter(r["action"] for r in records)["layout.started"] == 1
    assert _one(records, "layout.finished")["outcome"] == "done"
    quarantined = _one(records, "partition.state", partition_uuid=other, outcome="quarantined")
    assert quarantined["actor"]["kind"] == "admin"
    assert quarantined["detail"]["reason"] == "operator: operator check"
    fault = _one(records, "health.event")
    assert fault["outcome"] == "quarantine_gpu" and fault["detail"]["code"] == 79
    assert fault["actor"] == {"kind": "agent"}
    # The agent's start is the first record; its stop is recorded and the chain verifies.
    assert records[0]["action"] == "agent.start"
    assert len(records[0]["detail"]["config_sha256"]) == 64
    agent.stop()
    final = agent.cli_json("audit", "show", "--limit", "1")["records"]
    assert final[0]["action"] == "agent.stop"
    verified = agent.cli_json("audit", "verify")
    assert verified["ok"], verified
    assert verified["checkpoints"] >= 1  # the stop is covered by a checkpoint
    assert verified["last_seq"] == final[0]["seq"]
    # Every seq once, in order, each naming its predecessor's hash.
    shown = _records(agent)
    assert [r["seq"] for r in shown] == list(range(1, len(shown) + 1))
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(shown))
