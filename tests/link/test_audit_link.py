"""The audit log over the link, with the controller, an agent on a simulated node and its booted
swtpm as real processes over mutual TLS (docs/audit.md): a remote command's records name the
command and its signing key; checkpoints reach the controller, which acks them (so rotation may
remove what they cover); a node whose log was cut short is found on both sides."""

from __future__ import annotations

import contextlib
import errno
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.link.support import Controller, LinkNode, wait_for
from tests.link.test_commands import boot, configure_booted, run, tenants_parent, wait_trust
from tests.support import all_gpu_nodes, probe, wait_all_clean


@pytest.fixture
def audited(tmp_path: Path) -> Iterator[tuple[Controller, LinkNode, Path]]:
    with tenants_parent("accelguard-audit") as parent:
        controller = Controller(tmp_path / "controller")
        controller.init(attest_interval_s=3.0, command_timeout_s=60.0)
        controller.start()
        node = LinkNode(tmp_path / "node", controller)
        try:
            boot(node)
            configure_booted(
                node, parent, {"controller": controller.link_address, "heartbeat_s": 1.0},
                audit={"checkpoint_records": 5, "checkpoint_interval_s": 1.0},
            )  # fmt: skip
            node.agent.start()
            enrolled = node.enroll(controller.token(node.node_id))
            assert enrolled.returncode == 0, enrolled.stderr
            wait_trust(controller, node, "trusted")
            wait_all_clean(node.agent)
            yield controller, node, parent
        finally:
            node.close()
            controller.stop()


def test_remote_commands_and_checkpoints_over_the_link(
    audited: tuple[Controller, LinkNode, Path],
) -> None:
    controller, node, parent = audited
    cgroup = parent / "tenant-audit"
    cgroup.mkdir()
    code, status = run(
        controller, "lease", "grant", "--node", node.node_id, "--tenant", "alice",
        "--profile", "gpu", "--cgroup", str(cgroup), "--ttl", "3600",
    )  # fmt: skip
    assert code == 0, status
    lease_id = status["result"]["grant"]["lease"]["id"]
    allowed = status["result"]["grant"]["partition"]["device_nodes"]
    seen = probe(cgroup, all_gpu_nodes(node.agent.config.devices.dev_root))
    assert {seen[path] for path in allowed} == {errno.ENXIO}
    code, status = run(controller, "lease", "release", "--node", node.node_id, lease_id)
    assert code == 0, status
    cgroup.rmdir()

    # The records of the remote grant name the command and the key that signed it.
    records = node.agent.cli_json("audit", "show", "--lease", lease_id)["records"]
    granting = next(r for r in records if r["action"] == "lease.granting")
    assert granting["actor"]["kind"] == "controller"
    command_id = granting["actor"]["command_id"]
    assert len(command_id) == 32 and granting["actor"]["key_id"]
    commands = [r for r in node.agent.cli_json("audit", "show")["records"]
                if r["action"] == "command.grant_lease"]  # fmt: skip
    assert len(commands) == 1
    assert commands[0]["outcome"] == "done"
    assert commands[0]["detail"]["command_id"] == command_id
    assert commands[0]["actor"] == granting["actor"]

    # Checkpoints reach the controller and are acked; its history of them is consistent.
    def acked() -> bool:
        rows = node.outbox("SELECT COUNT(*) FROM audit_checkpoints WHERE acked_at IS NOT NULL")
        return int(rows[0][0]) >= 2

    wait_for(acked, "acked audit checkpoints", timeout=60)
    verdict = controller.ctl_json("audit", "verify", "--node", node.node_id)
    assert verdict["ok"], verdict
    assert verdict["checkpoints"] >= 2
    theirs = node.root / "checkpoints.json"
    listed = controller.ctl("audit", "checkpoints", "--node", node.node_id)
    assert listed.returncode == 0, listed.stderr
    theirs.write_text(listed.stdout)
    assert node.agent.cli_json("audit", "verify", "--checkpoints", str(theirs))["ok"]

    # Someone with root cuts the log's last ten records and the local checkpoints covering them,
    # with the agent stopped.
    node.agent.stop()
    last = max(c["seq"] for c in json.loads(theirs.read_text())["checkpoints"])
    with contextlib.closing(sqlite3.connect(node.agent.config.node.store_path)) as db, db:
        db.execute("DELETE FROM audit_log WHERE seq > ?", (last - 10,))
        db.execute("DELETE FROM audit_checkpoints WHERE seq > ?", (last - 10,))
    # The node's own verify finds it against the controller's copy ...
    cut = node.agent.cli("audit", "verify", "--checkpoints", str(theirs), "--json")
    assert cut.returncode == 1, cut.stderr
    assert json.loads(cut.stdout)["first_problem"]["kind"] == "truncated", cut.stdout
    # ... and the controller finds it as soon as the node checkpoints again.
    node.agent.start()

    def found() -> list[dict[str, str]] | None:
        result = controller.ctl("audit", "verify", "--node", node.node_id, "--json")
        document = json.loads(result.stdout)
        return document["findings"] or None

    findings = wait_for(found, "the controller's finding", timeout=60)
    assert findings[0]["kind"] in ("truncated", "fork"), findings
    refused = controller.ctl("audit", "verify", "--node", node.node_id)
    assert refused.returncode == 1
    assert "audit checkpoints show tampering" in refused.stderr
