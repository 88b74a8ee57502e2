from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.errors import JournalCorruptError, StoreError
from agent.store import MIGRATIONS, LeaseState, PartitionRecord, PartitionState, Store, SyncResult
from agent.store.siblings import vnpu_identity


def _record(uuid: str, **overrides: object) -> PartitionRecord:
    fields: dict[str, object] = {
        "uuid": uuid, "kind": "mig", "gpu_uuid": "GPU-1", "gpu_index": 0, "gi_id": 1, "ci_id": 0,
        "profile": "3g.40gb", "placement_start": 0, "placement_size": 4, "state": "free",
        "clean": False, "reason": "new", "present": True, "updated_at": 0.0,
    }  # fmt: skip
    fields.update(overrides)
    return PartitionRecord(**fields)  # type: ignore[arg-type]


def test_fresh_store_is_migrated_to_latest_with_durable_settings(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db")
    assert store.schema_version == len(MIGRATIONS)
    db = sqlite3.connect(tmp_path / "agent.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert (tmp_path / "agent.db").stat().st_mode & 0o777 == 0o600
    store.close()


def test_migrations_apply_in_order_from_any_version(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(MIGRATIONS[0])
    db.execute("PRAGMA user_version = 1")
    db.close()
    store = Store(path)
    assert store.schema_version == len(MIGRATIONS)
    store.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer than this agent"):
        Store(path)


def test_unknown_partitions_start_dirty_and_history_is_kept(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db")
    assert store.sync_partitions([_record("MIG-a"), _record("MIG-b")]).new == ["MIG-a", "MIG-b"]
    store.set_partition_state("MIG-a", "free", clean=True, reason="")
    # A second sync of the same hardware changes nothing and reports nothing new.
    assert store.sync_partitions([_record("MIG-a"), _record("MIG-b")]) == SyncResult()
    assert store.partition("MIG-a").clean  # type: ignore[union-attr]
    # MIG-b disappears: it is kept, marked absent, and not listed as present.
    store.sync_partitions([_record("MIG-a")])
    assert [p.uuid for p in store.partitions()] == ["MIG-a"]
    gone = store.partition("MIG-b")
    assert gone is not None and not gone.present and not gone.clean
    store.close()


def test_state_constraint_rejects_unknown_state(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db")
    store.sync_partitions([_record("MIG-a")])
    with pytest.raises(StoreError):
        store.set_partition_state("MIG-a", "borrowed")
    with pytest.raises(StoreError, match="not in the journal"):
        store.set_partition_state("MIG-zzz", "free")
    store.close()


def test_clean_flag_dies_with_the_partition_identity(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db")
    store.sync_partitions([_record("MIG-a", identity="GI 1 placement 0+4")])
    store.set_partition_state("MIG-a", "free", clean=True, reason="")
    # Same UUID, another placement: the clean flag belonged to the old one.
    result = store.sync_partitions([_record("MIG-a", identity="GI 1 placement 4+4")])
    assert result.changed == ["MIG-a"]
    record = store.partition("MIG-a")
    assert record is not None and not record.clean and "changed identity" in record.reason
    # Vanished, then back (a whole GPU after MIG on and off again): dirty, never clean.
    store.set_partition_state("MIG-a", "free", clean=True, reason="")
    assert store.sync_partitions([]).vanished == ["MIG-a"]
    assert store.sync_partitions([_record("MIG-a", identity="GI 1 placement 4+4")]).changed == [
        "MIG-a"
    ]
    record = store.partition("MIG-a")
    assert record is not None and record.present and not record.clean
    assert "came back" in record.reason
    store.close()


def _vnpu(uuid: str, npu: str, vdev: int, units: tuple[int, ...]) -> PartitionRecord:
    """A vNPU as the inventory records it; no ``units``: the library reports none (Huawei's)."""
    return _record(
        uuid, kind="vnpu", gpu_uuid=npu, gi_id=vdev, ci_id=None, profile="vir08",
        identity=vnpu_identity(npu, vdev, "vir08", units),
    )  # fmt: skip


@pytest.mark.parametrize("units_known", [False, True])
def test_a_vnpu_vanishing_dirty_taints_siblings_whose_memory_is_unknown(
    tmp_path: Path, units_known: bool
) -> None:
    """Two vNPUs destroyed behind the agent's back, the clean one re-created with the same vdev
    id and template on the dirty one's memory: without memory units its identity looks the same,
    so a dirty sibling's vanishing is what makes it dirty (docs/npu.md)."""
    store = Store(tmp_path / "agent.db")
    low, high = ((0, 1), (2, 3)) if units_known else ((), ())
    clean, dirty = _vnpu("vNPU-a", "NPU-1", 100, low), _vnpu("vNPU-b", "NPU-1", 101, high)
    other_npu = _vnpu("vNPU-c", "NPU-2", 100, ())
    store.sync_partitions([clean, dirty, other_npu])
    store.set_partition_state("vNPU-a", "free", clean=True, reason="")
    store.set_partition_state("vNPU-c", "free", clean=True, reason="")
    store.set_partition_state("vNPU-b", "leased", clean=False, reason="")

    result = store.sync_partitions([clean, other_npu])  # vNPU-b is gone; vNPU-a "unchanged"
    assert result.vanished == ["vNPU-b"]
    a, c = store.partition("vNPU-a"), store.partition("vNPU-c")
    assert a is not None and c is not None
    assert c.clean, "another NPU's vNPU is not touched"
    if units_known:
        # Known units: vNPU-a's identity would have changed had it moved; it did not.
        assert a.clean and result.changed == []
    else:
        assert not a.clean and result.changed == ["vNPU-a"]
        assert "units" in a.reason
    store.close()


def test_a_clean_vnpu_vanishing_taints_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db")
    store.sync_partitions([_vnpu("vNPU-a", "NPU-1", 100, ()), _vnpu("vNPU-b", "NPU-1", 101, ())])
    for uuid in ("vNPU-a", "vNPU-b"):
        store.set_partition_state(uuid, "free", clean=True, reason="")
    assert store.sync_partitions([_vnpu("vNPU-a", "NPU-1", 100, ())]).changed == []
    assert store.partition("vNPU-a").clean  # type: ignore[union-attr]
    store.close()


def test_transition_is_compare_and_set(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db")
    store.sync_partitions([_record("MIG-a", identity="one")])
    assert not store.transition("MIG-a", [PartitionState.SCRUBBING], PartitionState.FREE)
    assert store.transition("MIG-a", [PartitionState.FREE], PartitionState.SCRUBBING, clean=False)
    # The identity guard: a scrub of "one" cannot clean what is now "two".
    store.sync_partitions([_record("MIG-a", identity="two")])
    assert not store.transition(
        "MIG-a", [PartitionState.SCRUBBING], PartitionState.FREE, clean=True, identity="one"
    )
    assert store.transition(
        "MIG-a", [PartitionState.SCRUBBING], PartitionState.FREE, clean=True, identity="two"
    )
    with pytest.raises(ValueError, match="borrowed"):
        store.transition("MIG-a", [PartitionState.FREE], "borrowed")
    store.close()


def test_lost_lease_is_terminal_and_quarantines(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db")
    store.sync_partitions([_record("MIG-a", identity="one")])
    store.set_partition_state("MIG-a", "free", clean=True, reason="")
    nodes = [("c", 195, 0, "/dev/nvidia0"), ("c", 510, 12, "/dev/nvidia-caps/nvidia-cap12")]
    assert store.begin_grant("lease-1", "MIG-a", "alice", "/sys/fs/cgroup/a", None, "", nodes)
    assert store.activate_lease("lease-1")
    assert store.lose_lease("lease-1", "vanished")
    assert not store.lose_lease("lease-1", "again")
    lease = store.lease("lease-1")
    assert lease is not None and lease.state == LeaseState.LOST and not lease.live
    assert lease.nodes == tuple(nodes) and lease.outcome == "lost: vanished"
    record = store.partition("MIG-a")
    assert record is not None and record.state == "quarantined" and record.lease_id is None
    assert store.leases(live_only=True) == []
    # The partition may be leased again once cleared: "lost" does not hold the unique index.
    store.set_partition_state("MIG-a", "free", clean=True, reason="")
    assert store.begin_grant("lease-2", "MIG-a", "bob", "/sys/fs/cgroup/b", None)
    store.close()


def test_migration_from_every_version_keeps_rows(tmp_path: Path) -> None:
    """Each older schema, with rows in it, migrates to the latest without losing them."""
    for version in range(2, len(MIGRATIONS)):
        path = tmp_path / f"v{version}.db"
        db = sqlite3.connect(path, isolation_level=None)
        for script in MIGRATIONS[:version]:
            db.executescript(script)
        db.execute(f"PRAGMA user_version = {version}")
        db.execute(
            "INSERT INTO partitions (uuid, kind, gpu_uuid, gpu_index, state, clean, updated_at, "
            "lease_id) VALUES ('MIG-a', 'mig', 'GPU-1', 0, 'leased', 0, 1.0, 'lease-1')"
        )
        db.execute(
            "INSERT INTO leases (id, partition_uuid, tenant, cgroup, state, created_at) "
            "VALUES ('lease-1', 'MIG-a', 'alice', '/sys/fs/cgroup/a', 'active', 1.0)"
        )
        db.close()
        store = Store(path)
        lease = store.lease("lease-1")
        assert lease is not None and lease.state == "active" and lease.tenant == "alice"
        assert lease.nodes == () and lease.outcome == ""
        record = store.partition("MIG-a")
        assert record is not None and record.lease_id == "lease-1" and record.identity == ""
        store.close()


def test_created_tells_a_new_journal_from_an_existing_one(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    for expected in (True, False):
        store = Store(path)
        assert store.created is expected
        store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").write_bytes(b"")  # truncated: as good as new, i.e. lost
    store = Store(path)
    assert store.created
    store.close()


def test_corrupt_journal_is_refused_with_the_recovery_path(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    store = Store(path)
    store.sync_partitions([_record(f"MIG-{i}") for i in range(200)])
    store.close()
    data = bytearray(path.read_bytes())
    # Overwrite a page in the middle (a torn write, a bad sector): not the header.
    data[8192 : 8192 + 512] = b"\xa5" * 512
    path.write_bytes(bytes(data))
    with pytest.raises(JournalCorruptError, match="state recover"):
        Store(path)
    path.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(JournalCorruptError, match="corrupt"):
        Store(path)
