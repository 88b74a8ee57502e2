from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.errors import StoreError
from agent.store import MIGRATIONS, PartitionRecord, Store


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
    assert store.sync_partitions([_record("MIG-a"), _record("MIG-b")]) == ["MIG-a", "MIG-b"]
    store.set_partition_state("MIG-a", "free", clean=True, reason="")
    # A second sync of the same hardware changes nothing and reports nothing new.
    assert store.sync_partitions([_record("MIG-a"), _record("MIG-b")]) == []
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
