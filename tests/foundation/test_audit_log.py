"""The audit log's chain and checkpoints: every kind of tampering is found, each with its own
finding and message; rotation keeps what no acked or exported checkpoint covers; the hard bound
refuses grants instead of losing history.

These work on a real journal file (agent/store) with the real signing and verification code;
tests/leases/test_audit_actions.py checks the records a running agent leaves.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.audit.trail import AuditService
from agent.audit.verify import VerifyReport, load_checkpoints_file, verify
from agent.config import AuditConfig, Config, NodeConfig
from agent.errors import AuditFullError, ValidationError
from agent.identity.node_key import NODE_KEY_FILE, NodeKey
from agent.runtime.executor import BlockingExecutor
from agent.store import PartitionRecord, Store, audit
from agent.store.audit import Actor, acting_as, chain_hash
from tests.support import run_cli

NODE = "node-audit"


def _partition(uuid: str) -> PartitionRecord:
    return PartitionRecord(
        uuid=uuid, kind="gpu", gpu_uuid=f"GPU-{uuid}", gpu_index=0, gi_id=None, ci_id=None,
        profile="", placement_start=None, placement_size=None, state="free", clean=True,
        reason="", present=True, updated_at=0.0, identity=f"gpu:{uuid}",
    )  # fmt: skip


class Node:
    """A journal with records from real store transitions and checkpoints every 5 records."""

    def __init__(
        self, root: Path, *, keep_records: int = 100_000, max_records: int = 10**6
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.config = Config(
            node=NodeConfig(id=NODE, state_dir=root),
            audit=AuditConfig(checkpoint_records=5, keep_records=keep_records,
                              max_records=max_records),
        )  # fmt: skip
        self.key = NodeKey.load_or_create(root / NODE_KEY_FILE)
        self.store = Store(self.config.node.store_path)
        self.service = AuditService(self.config, self.store, BlockingExecutor(), self.key)
        self.leases = 0

    def lease_cycle(self) -> str:
        """Grant and release a lease: five records."""
        self.leases += 1
        lease_id = f"lease-{self.leases}"
        uuid = "GPU-a"
        if self.store.partition(uuid) is None:
            self.store.sync_partitions([_partition(uuid)])
            self.store.set_partition_state(uuid, "free", clean=True)
        with acting_as(Actor("admin", uid=0, gid=0, pid=4242)):
            assert self.store.begin_grant(lease_id, uuid, "alice", "/sys/fs/cgroup/x", None)
            assert self.store.activate_lease(lease_id)
            self.store.begin_release(lease_id, "done")
        self.store.finish_release(lease_id)
        self.store.set_partition_state(uuid, "free", clean=True)
        return lease_id

    def fill(self, cycles: int) -> None:
        for _ in range(cycles):
            self.lease_cycle()
            self.service.tick(due=False)

    def db(self) -> sqlite3.Connection:
        return self.store._db

    def verify(self, **kwargs: object) -> VerifyReport:
        return verify(self.db(), self.key.public_key(), NODE, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def node(tmp_path: Path) -> Node:
    built = Node(tmp_path / "state")
    built.fill(6)  # 2 + 6 * 5 records, a checkpoint after every 5 or more
    return built


def _kinds(report: VerifyReport) -> list[tuple[str, int]]:
    return [(f.kind, f.seq) for f in sorted(report.findings, key=lambda f: f.seq)]


def test_an_untouched_log_verifies(node: Node) -> None:
    report = node.verify()
    assert report.ok, report.to_dict()
    assert report.records == audit.head(node.db())[0] == 32
    assert report.checkpoints == len(audit.checkpoints(node.db())) >= 5


def test_an_edited_record_is_found(node: Node) -> None:
    node.db().execute('UPDATE audit_log SET detail = \'{"tenant":"mallory"}\' WHERE seq = 9')
    report = node.verify()
    assert report.first() is not None
    assert _kinds(report)[0] == ("edited", 9)
    assert "record 9 was changed after it was written" in report.first().message  # type: ignore[union-attr]


def test_an_edit_with_every_later_hash_recomputed_is_found_by_the_checkpoint(node: Node) -> None:
    db = node.db()
    db.execute("UPDATE audit_log SET outcome = 'forged' WHERE seq = 9")
    prev = bytes(db.execute("SELECT hash FROM audit_log WHERE seq = 8").fetchone()[0])
    for record in list(audit.records(db, from_seq=9)):
        digest = chain_hash(prev, record.content())
        db.execute("UPDATE audit_log SET prev_hash = ?, hash = ? WHERE seq = ?",
                   (prev, digest, record.seq))  # fmt: skip
        prev = digest
    report = node.verify()
    kinds = _kinds(report)
    assert kinds and kinds[0][0] == "rewritten", kinds
    assert kinds[0][1] >= 9
    assert "the records up to it were rewritten" in report.first().message  # type: ignore[union-attr]


def test_a_deleted_record_is_found(node: Node) -> None:
    node.db().execute("DELETE FROM audit_log WHERE seq = 12")
    report = node.verify()
    assert _kinds(report)[0] == ("deleted", 12)
    assert "record 12 is missing: the log goes from record 11 to record 13" in (
        report.first().message  # type: ignore[union-attr]
    )


def test_two_swapped_records_are_found(node: Node) -> None:
    db = node.db()
    rows = {seq: db.execute("SELECT * FROM audit_log WHERE seq = ?", (seq,)).fetchone()
            for seq in (14, 15)}  # fmt: skip
    db.execute("DELETE FROM audit_log WHERE seq IN (14, 15)")
    for seq, other in ((14, 15), (15, 14)):
        db.execute("INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (seq, *rows[other][1:]))  # fmt: skip
    report = node.verify()
    assert _kinds(report)[0] == ("swapped", 14)
    assert "records 14 and 15 were swapped" in report.first().message  # type: ignore[union-attr]


def _controller_copy(node: Node) -> list[audit.Checkpoint]:
    text = json.dumps({"node": NODE, "checkpoints": [c.to_dict() for c in
                                                     audit.checkpoints(node.db())]})  # fmt: skip
    return load_checkpoints_file(text.encode(), NODE)


def test_the_last_ten_records_truncated_are_found_against_the_controllers_checkpoints(
    node: Node,
) -> None:
    theirs = _controller_copy(node)
    last = max(c.seq for c in theirs)
    head = audit.head(node.db())[0]
    assert last == head  # the last record is covered
    db = node.db()
    # The thorough intruder: the last ten records and every local checkpoint that names them.
    db.execute("DELETE FROM audit_log WHERE seq > ?", (head - 10,))
    db.execute("DELETE FROM audit_checkpoints WHERE seq > ?", (head - 10,))
    assert node.verify().ok  # locally consistent: only the controller's copy shows it
    report = node.verify(external=theirs)
    assert _kinds(report)[0] == ("truncated", head - 9)
    assert (
        f"the log ends at record {head - 10} but the controller's checkpoint {last} covers "
        f"records up to {last}" in report.first().message  # type: ignore[union-attr]
    )


def test_a_checkpoint_signed_by_another_key_is_found(node: Node) -> None:
    from agent.audit.checkpoint import sign  # noqa: PLC0415

    db = node.db()
    target = audit.checkpoints(db)[1]
    forged = sign(NodeKey.generate(), NODE, seq=target.seq, head_hash=target.head_hash,
                  at=target.at, prev_seq=target.prev_seq, prev_hash=target.prev_hash)  # fmt: skip
    db.execute("UPDATE audit_checkpoints SET signature = ?, key_id = ? WHERE seq = ?",
               (forged.signature, forged.key_id, target.seq))  # fmt: skip
    report = node.verify()
    assert _kinds(report) == [("bad_signature", target.seq)]
    assert f"checkpoint {target.seq} is not signed by this node's key" in report.first().message  # type: ignore[union-attr]


def test_verify_on_the_command_line(node: Node, tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[node]\nid = "{NODE}"\nstate_dir = "{node.root}"\n')
    intact = run_cli("audit", "verify", config=config)
    assert intact.returncode == 0, intact.stderr
    assert "audit log intact: records 1 to 32" in intact.stdout
    theirs = tmp_path / "checkpoints.json"
    theirs.write_text(json.dumps({"node": NODE, "checkpoints": [
        c.to_dict() for c in audit.checkpoints(node.db())]}))  # fmt: skip
    node.db().execute("DELETE FROM audit_log WHERE seq > 22")
    node.db().execute("DELETE FROM audit_checkpoints WHERE seq > 22")
    cut = run_cli("audit", "verify", "--checkpoints", str(theirs), config=config)
    assert cut.returncode == 1
    assert cut.stderr.startswith("accelguard: error: audit log tampered: the log ends at record 22")
    as_json = run_cli("audit", "verify", "--checkpoints", str(theirs), "--json", config=config)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["first_problem"]["kind"] == "truncated"
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"node": "node-b", "checkpoints": []}))
    refused = run_cli("audit", "verify", "--checkpoints", str(other), config=config)
    assert refused.returncode == 2
    assert "it is node 'node-b''s, not 'node-audit''s" in refused.stderr


def test_rotation_keeps_what_no_acked_or_exported_checkpoint_covers(tmp_path: Path) -> None:
    node = Node(tmp_path / "state", keep_records=10)
    node.fill(8)
    db = node.db()
    head = audit.head(db)[0]
    assert node.service.rotate() == 0  # nothing acked or exported: everything stays
    assert audit.count(db) == head
    covered = audit.checkpoints(db)[2].seq
    audit.mark_exported(db, covered)
    removed = node.service.rotate()
    assert removed == covered  # keep_records would allow more, the export covers only these
    assert audit.anchor(db)[0] == covered
    report = node.verify()
    assert report.ok, report.to_dict()
    assert report.first_seq == covered + 1
    # Exporting everything lets rotation go down to keep_records.
    audit.mark_exported(db, audit.last_checkpoint(db).seq)  # type: ignore[union-attr]
    node.service.rotate()
    assert audit.count(db) == 10
    assert node.verify().ok


def test_the_hard_bound_refuses_grants_instead_of_losing_history(tmp_path: Path) -> None:
    node = Node(tmp_path / "state", keep_records=5, max_records=30)
    node.fill(5)  # 27 records
    with pytest.raises(AuditFullError, match=r"grant refused: the audit log holds \d+ records"):
        node.fill(2)
    before = audit.head(node.db())[0]
    assert node.store.lease("lease-7") is None  # the refused grant changed nothing
    audit.mark_exported(node.db(), audit.last_checkpoint(node.db()).seq)  # type: ignore[union-attr]
    node.service.rotate()
    node.fill(1)
    assert audit.head(node.db())[0] == before + 5
    assert node.verify().ok


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=4096))
def test_a_checkpoints_file_of_arbitrary_bytes_is_refused_cleanly(data: bytes) -> None:
    try:
        load_checkpoints_file(data, NODE)
    except ValidationError as error:
        assert str(error).startswith("checkpoints file:")


def test_a_copy_of_the_journal_verifies_elsewhere_with_the_public_key(
    node: Node, tmp_path: Path
) -> None:
    copy = tmp_path / "copy.db"
    node.store._db.execute("PRAGMA wal_checkpoint(FULL)")
    shutil.copy(node.config.node.store_path, copy)
    db = sqlite3.connect(copy)
    assert verify(db, node.key.public_key(), NODE).ok
    assert not verify(db, NodeKey.generate().public_key(), NODE).ok


def test_export_ships_the_log_and_lets_rotation_remove_what_it_holds(tmp_path: Path) -> None:
    node = Node(tmp_path / "state", keep_records=5, max_records=30)
    node.fill(5)
    config = tmp_path / "agent.toml"
    config.write_text(f'[node]\nid = "{NODE}"\nstate_dir = "{node.root}"\n')
    target = tmp_path / "audit-1.jsonl"
    exported = run_cli("audit", "export", str(target), config=config)
    assert exported.returncode == 0, exported.stderr
    assert target.stat().st_mode & 0o777 == 0o600
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert lines[0]["header"]["node"] == NODE
    records = [line["record"] for line in lines if "record" in line]
    assert [r["seq"] for r in records] == list(range(1, audit.head(node.db())[0] + 1))
    covered = max(line["checkpoint"]["seq"] for line in lines if "checkpoint" in line)
    assert audit.shipped_seq(node.db()) == covered
    # Rotation now removes what the file holds (down to keep_records), and grants go on.
    node.service.rotate()
    assert audit.anchor(node.db())[0] == min(covered, audit.head(node.db())[0] - 5)
    node.fill(2)
    assert node.verify().ok
    again = run_cli("audit", "export", str(target), config=config)
    assert again.returncode == 2
    assert "never overwrites" in again.stderr


def test_the_agent_finds_its_log_cut_behind_its_last_checkpoint_at_start(node: Node) -> None:
    """The start-up check (AuditService.self_check): the log's end against the last local
    checkpoint; cut or rewritten, it is named, and the agent records audit.tamper_detected."""
    assert node.service.self_check() is None
    last = audit.last_checkpoint(node.db())
    assert last is not None
    node.db().execute("DELETE FROM audit_log WHERE seq > ?", (last.seq - 3,))
    problem = node.service.self_check()
    assert problem is not None
    assert f"checkpoint {last.seq} covers up to {last.seq}: records were removed" in problem
