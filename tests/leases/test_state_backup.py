"""Backup and restore (`accelguard state export|import`) with a real agent on a simulated node.

The kernel judges the fences after a restore (ENXIO = allowed, EPERM = denied), the journal is
read back with sqlite3, and the file format is parsed and rebuilt here from its description in
agent/store/backup.py, not with its code.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent.cli import main
from agent.cli.state import identity_paths
from agent.config import config_as_dict, load_config, parse_config, to_toml
from agent.isolation import fence_for
from agent.isolation.rules import DeviceRule
from agent.sim.node import SimNode, init_sim_node
from agent.store.backup import IDENTITY_FILES
from agent.store.migrations import MIGRATIONS
from agent.store.restore import RESTORE_STEPS
from tests.fuzzing import MUTATIONS, fuzz, mutate
from tests.leases.helpers import any_tenant_cgroup, grant, layout_clean, lease_state
from tests.link.support import wait_for
from tests.support import ACCELGUARD, REPO, RunningAgent, all_gpu_nodes, probe, running_agent

MAGIC = b"accelguard state backup\n"
PASSPHRASE = "correct horse battery staple"
# Stand-ins for an enrolled node's link identity (the simulated node has no controller).
TLS_FILES = {"node.key": b"tls key\n", "node.pem": b"certificate\n", "ca.pem": b"pinned ca\n",
             "enrollment.json": b"{}\n"}  # fmt: skip


def _node(root: Path, cgroup_parents: list[Path] | None = None) -> SimNode:
    """A simulated node whose link identity lives in its state directory (the default layout),
    not in the machine's /var/lib/accelguard."""
    node = init_sim_node(root, "h100x2", cgroup_parents=cgroup_parents, slice_bytes=1 << 20)
    document = config_as_dict(load_config(node.config_path))
    document["link"]["cert_dir"] = str(root / "state" / "link")
    # The fence survey runs every refresh: short, so a removed stray cgroup is seen soon.
    document["inventory"]["refresh_interval_s"] = 1.0
    node.config_path.write_text(to_toml(parse_config(document)))
    return node


@pytest.fixture
def agent(tmp_path: Path, cgroup_parents: dict[str, Path]) -> Iterator[RunningAgent]:
    with running_agent(_node(tmp_path / "node", list(cgroup_parents.values()))) as running:
        yield running


@pytest.fixture
def passphrase_file(tmp_path: Path) -> Path:
    path = tmp_path / "passphrase"
    path.write_text(PASSPHRASE + "\n")
    return path


def _state(agent: RunningAgent) -> dict[str, str]:
    """Every file of the state directory (the lock aside) with its SHA-256."""
    root = agent.config.node.state_dir
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "agent.lock"
    }


def _journal(agent: RunningAgent) -> sqlite3.Connection:
    path = agent.config.node.store_path
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _refused(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def _unpack(data: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    assert data[: len(MAGIC)] == MAGIC
    (length,) = struct.unpack(">I", data[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4 + length
    manifest = json.loads(data[len(MAGIC) + 4 : start])
    size = manifest["journal"]["size"]
    identity = manifest["identity"]["size"] if manifest["identity"] else 0
    assert len(data) == start + size + identity + 32
    assert hashlib.sha256(data[:-32]).digest() == data[-32:]
    return manifest, data[start : start + size], data[start + size : start + size + identity]


def _pack(manifest: dict[str, Any], journal: bytes, identity: bytes = b"") -> bytes:
    journal_fields = {"size": len(journal), "sha256": hashlib.sha256(journal).hexdigest()}
    manifest = {**manifest, "journal": {**manifest["journal"], **journal_fields}}
    header = json.dumps(manifest).encode()
    body = MAGIC + struct.pack(">I", len(header)) + header + journal + identity
    return body + hashlib.sha256(body).digest()


def _public(pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(pem, password=None)
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _rules(paths: list[str]) -> list[DeviceRule]:
    return [
        DeviceRule("c", os.major(rdev), os.minor(rdev), frozenset("rw"))
        for rdev in (Path(path).stat().st_rdev for path in paths)
    ]


def test_restore_on_a_wiped_node(
    agent: RunningAgent, cgroup_parents: dict[str, Path], tmp_path: Path
) -> None:
    partitions = layout_clean(agent, "1g.10gb=3")
    alice_cgroup = any_tenant_cgroup(cgroup_parents, "alice")
    alice = grant(agent, "alice", alice_cgroup, profile="1g.10gb")
    own = alice["partition"]["device_nodes"]
    certificates = agent.cli_json("scrub", "certs")["certificates"]
    backup = tmp_path / "backup.agsb"
    exported = agent.cli("state", "export", str(backup))
    assert exported.returncode == 0, exported.stderr
    assert backup.stat().st_mode & 0o777 == 0o600
    # After the backup: a lease the backup cannot know of.
    bob_cgroup = any_tenant_cgroup(cgroup_parents, "bob")
    bob = grant(agent, "bob", bob_cgroup, profile="1g.10gb")
    assert agent.stop() == 0
    # While the agent is down, alice's fence is widened to every GPU node: only the agent's
    # start-up reconciliation narrows it back.
    everything = all_gpu_nodes(agent.node.root / "dev")
    fence_for(alice_cgroup).apply(alice_cgroup, _rules(everything))
    shutil.rmtree(agent.config.node.state_dir)

    imported = agent.cli("state", "import", str(backup))
    assert imported.returncode == 0, imported.stderr
    alice_uuid, bob_uuid = alice["partition"]["uuid"], bob["partition"]["uuid"]
    with contextlib.closing(_journal(agent)) as db:
        found = db.execute("SELECT uuid, state, clean, reason FROM partitions").fetchall()
        rows = {row[0]: row[1:] for row in found}
        keys = dict(db.execute("SELECT key, value FROM meta").fetchall())
        leases = dict(db.execute("SELECT id, state FROM leases").fetchall())
    assert leases == {alice["lease"]["id"]: "active"}
    assert rows[alice_uuid][:2] == ("leased", 0)
    for uuid, (state, clean, reason) in rows.items():
        if uuid != alice_uuid:
            assert (state, clean) == ("free", 0), rows
            assert reason.startswith("restored from a backup of "), reason
    assert "restored_at" in keys

    agent.start()
    assert "journal_lost" not in agent.log()
    assert lease_state(agent, alice["lease"]["id"])["state"] == "active"
    assert set(probe(alice_cgroup, own).values()) == {errno.ENXIO}
    others = [path for path in everything if path not in own]
    assert set(probe(alice_cgroup, others).values()) == {errno.EPERM}

    # Bob's fence outlived the backup: his partition is quarantined, never handed out; every
    # other partition is scrubbed before anyone gets it.
    def settled() -> list[dict[str, Any]] | None:
        listed = {p["uuid"]: p for p in agent.cli_json("partition", "list")["partitions"]}
        rest = [p for uuid, p in listed.items() if uuid not in (alice_uuid, bob_uuid)]
        done = listed[bob_uuid]["state"] == "quarantined" and all(
            p["state"] == "free" and p["clean"] for p in rest
        )
        return rest if done else None

    rest = wait_for(settled, "the restored partitions scrubbed or quarantined")
    assert len(rest) == len(partitions) - 2
    after = agent.cli_json("scrub", "certs")["certificates"]
    signatures = {c["signature"] for c in after}
    assert {c["signature"] for c in certificates} <= signatures, "a certificate was lost"
    new = [c for c in after if c["signature"] not in {x["signature"] for x in certificates}]
    assert {c["payload"]["partition_uuid"] for c in new} >= {p["uuid"] for p in rest}
    assert all(c["payload"]["verified"] for c in new)
    # The audit chain runs on unbroken across the restore: what was recorded before the
    # export, the import (by the operator), then the new agent's records.
    verified = agent.cli_json("audit", "verify")
    assert verified["ok"], verified
    records = agent.cli_json("audit", "show")["records"]
    imported_at = [r for r in records if r["action"] == "state.imported"]
    assert len(imported_at) == 1 and imported_at[0]["actor"]["kind"] == "operator"
    assert any(r["action"] == "lease.granting" and r["lease_id"] == alice["lease"]["id"]
               and r["seq"] < imported_at[0]["seq"] for r in records)  # fmt: skip
    assert records[-1]["seq"] > imported_at[0]["seq"]
    # Bob's stray fence allows his GPU's node: nothing on that GPU is granted while it is there.
    carol_cgroup = any_tenant_cgroup(cgroup_parents, "carol")
    refused = agent.cli("lease", "grant", "--tenant", "carol", "--profile", "1g.10gb",
                        "--cgroup", str(carol_cgroup))  # fmt: skip
    assert refused.returncode != 0 and str(bob_cgroup) in refused.stderr, refused.stderr
    bob_cgroup.rmdir()  # the operator removes it; the next fence survey sees it gone

    def granted() -> Any:
        result = agent.cli("lease", "grant", "--tenant", "carol", "--profile", "1g.10gb",
                           "--cgroup", str(carol_cgroup), "--json")  # fmt: skip
        return json.loads(result.stdout) if result.returncode == 0 else None

    carol = wait_for(granted, "a grant once the stray fence is gone", timeout=30, interval=0.5)
    assert carol["partition"]["uuid"] in {p["uuid"] for p in rest}


def test_refusals_change_nothing(
    agent: RunningAgent, tmp_path: Path, passphrase_file: Path
) -> None:
    layout_clean(agent, "1g.10gb=2")
    backup = tmp_path / "backup.agsb"
    exported = agent.cli(
        "state", "export", str(backup), "--identity", "encrypt",
        "--passphrase-file", str(passphrase_file),
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    good = backup.read_bytes()

    # A running agent: the import touches nothing.
    _refused(agent.cli("state", "import", str(backup)), 1, "another accelguard agent")
    assert not list(agent.config.node.state_dir.glob("*import*"))
    # An existing file is not replaced without --force.
    _refused(agent.cli("state", "export", str(backup)), 2, "exists", "--force")
    assert backup.read_bytes() == good
    replaced = tmp_path / "replaced.agsb"
    replaced.write_bytes(b"old")
    assert agent.cli("state", "export", str(replaced), "--force").returncode == 0
    assert replaced.read_bytes()[: len(MAGIC)] == MAGIC

    other = _node(tmp_path / "other")
    with running_agent(other) as stranger:
        foreign = tmp_path / "other.agsb"
        assert stranger.cli("state", "export", str(foreign)).returncode == 0
    assert agent.stop() == 0
    before = _state(agent)

    manifest, journal, identity = _unpack(good)
    corrupt = bytearray(good)
    corrupt[len(good) // 2] ^= 0x40
    newer = tmp_path / "newer.db"
    newer.write_bytes(journal)
    with contextlib.closing(sqlite3.connect(newer)) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    schema = {**manifest["journal"], "schema_version": len(MIGRATIONS) + 1}
    newer_manifest = {**manifest, "journal": schema, "identity": None}
    wrong = tmp_path / "wrong-passphrase"
    wrong.write_text("not the passphrase at all\n")
    cases: list[tuple[str, bytes, list[str], int, list[str]]] = [
        ("corrupt", bytes(corrupt), [], 2, ["damaged"]),
        ("truncated", good[:-1000], [], 2, ["truncated"]),
        ("passphrase", good, ["--passphrase-file", str(wrong)], 2, ["wrong passphrase"]),
        ("version", _pack({**manifest, "format_version": 2}, journal, identity), [], 2,
         ["format version 2"]),
        ("schema", _pack(newer_manifest, newer.read_bytes()), [], 2,
         [f"schema version {len(MIGRATIONS) + 1}", "newer than this agent knows"]),
        ("foreign", foreign.read_bytes(), [], 2, ["backup of another node", "--force"]),
        ("empty", b"", [], 2, ["not an accelguard state backup"]),
    ]  # fmt: skip
    for name, data, extra, code, words in cases:
        path = tmp_path / f"{name}.agsb"
        path.write_bytes(data)
        _refused(agent.cli("state", "import", str(path), *extra), code, *words)
        assert _state(agent) == before, name

    forced = agent.cli("state", "import", str(tmp_path / "foreign.agsb"), "--force")
    assert forced.returncode == 0, forced.stderr
    assert "another node's backup, imported with --force" in forced.stdout
    assert _state(agent) != before
    # Without a node key (a wiped node), "this node" is its configured id.
    (agent.config.node.state_dir / "node-key.pem").unlink()
    without_key = agent.cli("state", "import", str(tmp_path / "foreign.agsb"))
    _refused(without_key, 2, "no node key yet and its id is 'sim-node'", "'sim-other'")


def test_identity_round_trip(agent: RunningAgent, tmp_path: Path, passphrase_file: Path) -> None:
    layout_clean(agent, "1g.10gb=2")
    cert_dir = agent.config.link.cert_dir
    cert_dir.mkdir(mode=0o700)
    for name, content in TLS_FILES.items():
        (cert_dir / name).write_bytes(content)
        (cert_dir / name).chmod(0o600)
    key_path = agent.config.node.state_dir / "node-key.pem"
    original = _public(key_path.read_bytes())
    # Every member the file format knows has its place on the node.
    assert set(identity_paths(agent.config)) == set(IDENTITY_FILES)

    plain, sealed = tmp_path / "plain.agsb", tmp_path / "sealed.agsb"
    assert agent.cli("state", "export", str(plain)).returncode == 0
    no_terminal = subprocess.run(
        [*ACCELGUARD, "--config", str(agent.config_path), "state", "export", str(sealed),
         "--identity", "encrypt"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    _refused(no_terminal, 2, "needs a passphrase", "--passphrase-file")
    short = tmp_path / "short"
    short.write_text("too short\n")
    _refused(
        agent.cli("state", "export", str(sealed), "--identity", "encrypt",
                  "--passphrase-file", str(short)),
        2, "at least 12 characters",
    )  # fmt: skip
    assert not sealed.exists()
    exported = agent.cli(
        "state", "export", str(sealed), "--identity", "encrypt",
        "--passphrase-file", str(passphrase_file),
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    # No key in clear in either file: not without the passphrase, not with it.
    for path in (plain, sealed):
        data = path.read_bytes()
        assert b"PRIVATE KEY" not in data
        assert not any(content in data for content in TLS_FILES.values())
    assert _unpack(plain.read_bytes())[0]["identity"] is None
    assert _unpack(sealed.read_bytes())[0]["identity"]["kdf"]["name"] == "scrypt"

    assert agent.stop() == 0
    shutil.rmtree(agent.config.node.state_dir)
    imported = agent.cli("state", "import", str(sealed), "--passphrase-file", str(passphrase_file))
    assert imported.returncode == 0, imported.stderr
    assert _public(key_path.read_bytes()) == original
    for name, content in TLS_FILES.items():
        assert (cert_dir / name).read_bytes() == content
        assert (cert_dir / name).stat().st_mode & 0o777 == 0o600
    agent.start()
    # The restored key signs again: a certificate of a scrub after the restore carries it.
    wait_for(
        lambda: len(agent.cli_json("scrub", "certs")["certificates"]) == 4,
        "the restored partitions scrubbed",
    )
    for document in agent.cli_json("scrub", "certs")["certificates"]:
        public = serialization.load_pem_public_key(document["public_key"].encode())
        assert (
            public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            == original
        )


CRASH = """
import os, signal, sys
from pathlib import Path
import agent.cli.state as state
from agent.cli import build_parser
from agent.config import load_config
config, backup, passphrase, point = sys.argv[1:5]
args = build_parser().parse_args(
    ["--config", config, "state", "import", backup, "--passphrase-file", passphrase]
)
def crash(step):
    if step == point:
        os.kill(os.getpid(), signal.SIGKILL)
state.import_state(args, load_config(Path(config)), after_step=crash)
"""


@pytest.mark.parametrize("point", RESTORE_STEPS)
def test_an_interrupted_import_leaves_one_whole_journal(
    agent: RunningAgent, cgroup_parents: dict[str, Path], tmp_path: Path,
    passphrase_file: Path, point: str,
) -> None:  # fmt: skip
    layout_clean(agent, "1g.10gb=2")
    alice_cgroup = any_tenant_cgroup(cgroup_parents, "alice")
    alice = grant(agent, "alice", alice_cgroup, profile="1g.10gb")
    backup = tmp_path / "backup.agsb"
    exported = agent.cli(
        "state", "export", str(backup), "--identity", "encrypt",
        "--passphrase-file", str(passphrase_file),
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    bob = grant(agent, "bob", any_tenant_cgroup(cgroup_parents, "bob"), profile="1g.10gb")
    assert agent.stop() == 0
    key = agent.config.node.state_dir / "node-key.pem"
    original = _public(key.read_bytes())

    crashed = subprocess.run(
        [sys.executable, "-c", CRASH, str(agent.config_path), str(backup), str(passphrase_file),
         point],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip
    assert crashed.returncode == -9, crashed.stderr
    with contextlib.closing(_journal(agent)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        restored = db.execute("SELECT value FROM meta WHERE key = 'restored_at'").fetchone()
        leases = dict(db.execute("SELECT id, state FROM leases").fetchall())
    if point == "journal":
        assert restored is not None
        assert leases == {alice["lease"]["id"]: "active"}
    else:  # the previous journal, whole: bob's lease in it
        assert restored is None
        assert leases[bob["lease"]["id"]] == "active"
    assert _public(key.read_bytes()) == original

    again = agent.cli("state", "import", str(backup), "--passphrase-file", str(passphrase_file))
    assert again.returncode == 0, again.stderr
    assert not list(agent.config.node.state_dir.glob(".import-*"))
    agent.start()
    assert lease_state(agent, alice["lease"]["id"])["state"] == "active"
    assert set(probe(alice_cgroup, alice["partition"]["device_nodes"]).values()) == {errno.ENXIO}


def test_an_older_schema_is_imported_and_migrated_at_start(tmp_path: Path) -> None:
    node = _node(tmp_path / "node")
    with running_agent(node) as running:
        layout_clean(running, "1g.10gb=2")
        backup = tmp_path / "backup.agsb"
        assert running.cli("state", "export", str(backup)).returncode == 0
        assert running.stop() == 0
        manifest, _, _ = _unpack(backup.read_bytes())
        # A journal as an agent of four migrations ago left it, with a partition it knew clean.
        old = tmp_path / "old.db"
        with contextlib.closing(sqlite3.connect(old, isolation_level=None)) as db:
            for version, script in enumerate(MIGRATIONS[:4]):
                db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {version + 1};\nCOMMIT;")
            db.execute(
                "INSERT INTO partitions (uuid, kind, gpu_uuid, gpu_index, state, clean, "
                "updated_at) VALUES ('MIG-old', 'mig', 'GPU-old', 0, 'free', 1, 0)"
            )
        journal = {**manifest["journal"], "schema_version": 4}
        older = tmp_path / "older.agsb"
        older.write_bytes(_pack({**manifest, "journal": journal}, old.read_bytes()))
        imported = running.cli("state", "import", str(older))
        assert imported.returncode == 0, imported.stderr
        running.start()
        assert "journal_lost" not in running.log()
        with contextlib.closing(_journal(running)) as db:
            assert db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
            assert db.execute("SELECT clean FROM partitions WHERE uuid = 'MIG-old'").fetchone() == (
                0,
            )
        # The partitions the hardware shows were unknown to that journal: scrubbed before use.
        wait_for(lambda: all(p["clean"] for p in running.partitions()), "the partitions scrubbed")


def test_outbox_epoch_changes_and_acked_reports_go(tmp_path: Path) -> None:
    from agent.store import Store  # noqa: PLC0415
    from agent.store.outbox import Outbox, OutboxLimits  # noqa: PLC0415

    node = _node(tmp_path / "node")
    config = load_config(node.config_path)
    store = Store(config.node.store_path)
    outbox = Outbox(store, OutboxLimits(100, 1 << 20, 10, 3600.0))
    old_epoch = outbox.epoch()
    for number in range(4):
        outbox.enqueue("lease", f"report {number}".encode(), droppable=False)
    outbox.ack_through(2)
    store.close()
    backup = tmp_path / "backup.agsb"
    assert subprocess.run([*ACCELGUARD, "--config", str(node.config_path), "state", "export",
                           str(backup)], cwd=REPO, check=False).returncode == 0  # fmt: skip
    result = subprocess.run(
        [*ACCELGUARD, "--config", str(node.config_path), "state", "import", str(backup)],
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "2 unacknowledged reports will be sent again, 2 acknowledged ones dropped" in (
        result.stdout
    )
    store = Store(config.node.store_path)
    try:
        outbox = Outbox(store, OutboxLimits(100, 1 << 20, 10, 3600.0))
        assert outbox.epoch() not in (old_epoch, 0)
        assert [entry.seq for entry in outbox.pending(0, 10)] == [3, 4]
        assert outbox.last_seq() == 4  # seqs are never reused, whatever the epoch
    finally:
        store.close()


# -- hostile files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped_node(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimNode, bytes]:
    """A node with a journal and its own backup; its agent stopped."""
    root = tmp_path_factory.mktemp("fuzz")
    node = _node(root / "node")
    with running_agent(node) as running:
        layout_clean(running, "1g.10gb=2")
        backup = root / "backup.agsb"
        assert running.cli("state", "export", str(backup)).returncode == 0
        assert running.stop() == 0
    return node, backup.read_bytes()


def _import_in_process(node: SimNode, data: bytes) -> int:
    path = node.root / "candidate.agsb"
    path.write_bytes(data)
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        code = main(["--config", str(node.config_path), "state", "import", str(path)])
    assert len(output.getvalue().splitlines()) == 1, output.getvalue()
    return code


def _files(node: SimNode) -> dict[str, bytes]:
    state = node.root / "state"
    return {str(p): p.read_bytes() for p in state.rglob("*") if p.is_file() and p.suffix != ".lock"}


FUZZ = settings(fuzz(200), suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture,
])  # fmt: skip


@FUZZ
@given(data=st.binary(max_size=4096) | st.binary(max_size=4096).map(lambda tail: MAGIC + tail))
def test_arbitrary_bytes_are_refused(stopped_node: tuple[SimNode, bytes], data: bytes) -> None:
    node, _ = stopped_node
    before = _files(node)
    assert _import_in_process(node, data) == 2
    assert _files(node) == before


@FUZZ
@given(mutations=MUTATIONS)
def test_mutated_backups_are_refused(stopped_node: tuple[SimNode, bytes], mutations: Any) -> None:
    node, good = stopped_node
    data = mutate(good, mutations)
    assume(data != good)
    before = _files(node)
    started = time.monotonic()
    assert _import_in_process(node, data) == 2
    assert _files(node) == before
    assert time.monotonic() - started < 30
