"""The journal's schema, one migration per version: each entry moves the schema from version i to
i+1. Never edit a released migration: append one (tests/foundation/test_store.py migrates from
every version with rows in it)."""

from __future__ import annotations

# Each entry moves the schema from version i to i+1. Never edit a released migration: append one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE partitions (
        uuid TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('gpu', 'mig')),
        gpu_uuid TEXT NOT NULL,
        gpu_index INTEGER NOT NULL,
        gi_id INTEGER,
        ci_id INTEGER,
        profile TEXT NOT NULL DEFAULT '',
        placement_start INTEGER,
        placement_size INTEGER,
        state TEXT NOT NULL
            CHECK (state IN ('free', 'leased', 'releasing', 'scrubbing', 'quarantined')),
        clean INTEGER NOT NULL CHECK (clean IN (0, 1)),
        reason TEXT NOT NULL DEFAULT '',
        present INTEGER NOT NULL DEFAULT 1,
        updated_at REAL NOT NULL
    );
    CREATE TABLE layout_journal (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        gpu_uuid TEXT NOT NULL,
        plan TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
        detail TEXT NOT NULL DEFAULT '',
        started_at REAL NOT NULL,
        finished_at REAL
    );
    """,
    """
    ALTER TABLE partitions ADD COLUMN lease_id TEXT;
    ALTER TABLE partitions ADD COLUMN last_lease_id TEXT;
    CREATE TABLE leases (
        id TEXT PRIMARY KEY,
        partition_uuid TEXT NOT NULL,
        tenant TEXT NOT NULL,
        cgroup TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('granting', 'active', 'releasing', 'released')),
        created_at REAL NOT NULL,
        expires_at REAL,
        released_at REAL,
        release_reason TEXT NOT NULL DEFAULT ''
    );
    -- Invariant: a partition has at most one live lease.
    CREATE UNIQUE INDEX leases_one_live_per_partition
        ON leases (partition_uuid) WHERE state != 'released';
    CREATE TABLE scrubs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        partition_uuid TEXT NOT NULL,
        lease_id TEXT,
        started_at REAL NOT NULL,
        finished_at REAL,
        verified INTEGER NOT NULL DEFAULT 0,
        result TEXT NOT NULL DEFAULT '{}',
        error TEXT NOT NULL DEFAULT ''
    );
    """,
    """
    ALTER TABLE leases ADD COLUMN scrub_policy TEXT NOT NULL DEFAULT '';
    CREATE TABLE certificates (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        partition_uuid TEXT NOT NULL,
        lease_id TEXT,
        verified INTEGER NOT NULL,
        issued_at REAL NOT NULL,
        document TEXT NOT NULL
    );
    """,
    # 4: fail closed on hardware changed behind our back. A partition remembers the identity its
    # clean flag belongs to; a lease remembers the device nodes it was fenced to (the inventory
    # no longer knows them once the partition is gone) and how it ended; 'lost' is a new
    # terminal lease state. SQLite cannot alter a CHECK constraint: the leases table is rebuilt.
    """
    ALTER TABLE partitions ADD COLUMN identity TEXT NOT NULL DEFAULT '';
    CREATE TABLE leases_v4 (
        id TEXT PRIMARY KEY,
        partition_uuid TEXT NOT NULL,
        tenant TEXT NOT NULL,
        cgroup TEXT NOT NULL,
        state TEXT NOT NULL
            CHECK (state IN ('granting', 'active', 'releasing', 'released', 'lost')),
        created_at REAL NOT NULL,
        expires_at REAL,
        released_at REAL,
        release_reason TEXT NOT NULL DEFAULT '',
        scrub_policy TEXT NOT NULL DEFAULT '',
        nodes TEXT NOT NULL DEFAULT '[]',
        outcome TEXT NOT NULL DEFAULT ''
    );
    INSERT INTO leases_v4 (id, partition_uuid, tenant, cgroup, state, created_at, expires_at,
        released_at, release_reason, scrub_policy)
        SELECT id, partition_uuid, tenant, cgroup, state, created_at, expires_at, released_at,
            release_reason, scrub_policy FROM leases;
    DROP TABLE leases;
    ALTER TABLE leases_v4 RENAME TO leases;
    CREATE UNIQUE INDEX leases_one_live_per_partition
        ON leases (partition_uuid) WHERE state IN ('granting', 'active', 'releasing');
    """,
    # 5: the controller link's outbox (agent/link). Every report is written here before it is
    # sent; seq is its number in the node's sequence space (AUTOINCREMENT: never reused, even
    # after rows are deleted), acked_at marks a never-dropped report kept for the retention
    # window after the controller committed it.
    """
    CREATE TABLE link_outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        droppable INTEGER NOT NULL CHECK (droppable IN (0, 1)),
        body BLOB NOT NULL,
        created_at REAL NOT NULL,
        acked_at REAL
    );
    CREATE INDEX link_outbox_unacked_droppable ON link_outbox (droppable, seq)
        WHERE acked_at IS NULL;
    CREATE INDEX link_outbox_acked ON link_outbox (acked_at, seq) WHERE acked_at IS NOT NULL;
    """,
    # 6: remote commands (agent/link/commands.py). The replay cache: every authenticated command
    # id until its not_after has passed, with the result of its one run ('running' while it
    # runs: found so after a crash, the outcome is unknown and it is never run again). Refusals
    # are kept (bounded) for the operator and reported uplink.
    """
    CREATE TABLE commands (
        id BLOB PRIMARY KEY,
        kind TEXT NOT NULL,
        received_at REAL NOT NULL,
        not_after REAL NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('running', 'done')),
        result BLOB
    ) WITHOUT ROWID;
    CREATE INDEX commands_not_after ON commands (not_after);
    CREATE TABLE command_refusals (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        command_id BLOB NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL,
        at REAL NOT NULL
    );
    """,
    # 7: GPU health (agent/health, agent/store/health.py): every health event; the holds that
    # keep a health quarantine until an operator clears the partition; each GPU's last counters.
    """
    CREATE TABLE health_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        gpu_uuid TEXT NOT NULL,
        gpu_index INTEGER NOT NULL,
        kind TEXT NOT NULL,
        code INTEGER NOT NULL,
        gi_id INTEGER,
        ci_id INTEGER,
        action TEXT NOT NULL,
        reset_required INTEGER NOT NULL CHECK (reset_required IN (0, 1)),
        detail TEXT NOT NULL,
        partitions TEXT NOT NULL DEFAULT '[]'
    );
    CREATE TABLE health_holds (
        partition_uuid TEXT PRIMARY KEY,
        event_id INTEGER NOT NULL,
        reason TEXT NOT NULL,
        at REAL NOT NULL
    );
    CREATE TABLE health_counters (
        gpu_uuid TEXT PRIMARY KEY,
        ecc_aggregate_dbe INTEGER NOT NULL,
        remapped_uncorrectable INTEGER NOT NULL,
        remap_failure INTEGER NOT NULL CHECK (remap_failure IN (0, 1)),
        retired_dbe INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL
    );
    """,
    # 8: the audit log (agent/store/audit.py, agent/audit): one row per action, each naming the
    # SHA-256 of the row before it (prev_hash) and its own (hash over its fields and prev_hash);
    # rows are appended and, once a signed checkpoint covering them was acked or exported,
    # removed oldest first (the anchor in meta keeps the chain checkable). Checkpoints are the
    # node key's signatures over (seq, head hash); report_seq is the outbox report carrying one.
    """
    CREATE TABLE audit_log (
        seq INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        outcome TEXT NOT NULL,
        lease_id TEXT,
        partition_uuid TEXT,
        detail TEXT NOT NULL,
        prev_hash BLOB NOT NULL,
        hash BLOB NOT NULL
    );
    CREATE INDEX audit_log_lease ON audit_log (lease_id) WHERE lease_id IS NOT NULL;
    CREATE INDEX audit_log_partition ON audit_log (partition_uuid)
        WHERE partition_uuid IS NOT NULL;
    CREATE INDEX audit_log_at ON audit_log (at);
    CREATE TABLE audit_checkpoints (
        seq INTEGER PRIMARY KEY,
        head_hash BLOB NOT NULL,
        at REAL NOT NULL,
        prev_seq INTEGER NOT NULL,
        prev_hash BLOB NOT NULL,
        key_id TEXT NOT NULL,
        signature BLOB NOT NULL,
        report_seq INTEGER,
        acked_at REAL,
        exported_at REAL
    );
    """,
    # 9: the desired layout (agent/store/layouts.py): per GPU UUID what the last `layout apply`
    # on it asked for (MIG on with these instances, none, or MIG off), re-applied at start-up,
    # and the outcome of the last apply or check of it.
    """
    CREATE TABLE desired_layouts (
        gpu_uuid TEXT PRIMARY KEY,
        gpu_index INTEGER NOT NULL,
        mig_enabled INTEGER NOT NULL CHECK (mig_enabled IN (0, 1)),
        counts TEXT NOT NULL DEFAULT '{}',
        recorded_at REAL NOT NULL,
        recorded_by TEXT NOT NULL DEFAULT '',
        outcome TEXT NOT NULL DEFAULT 'applying',
        outcome_detail TEXT NOT NULL DEFAULT '',
        checked_at REAL
    );
    """,
    # 10: NPUs and /dev/accel devices (docs/npu.md): partition kinds npu (a whole Ascend NPU),
    # vnpu (gi_id is its vdev id) and accel. SQLite cannot change a CHECK constraint, so the
    # table is rebuilt with every row and column as it was (nothing references it).
    """
    CREATE TABLE partitions_v10 (
        uuid TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('gpu', 'mig', 'npu', 'vnpu', 'accel')),
        gpu_uuid TEXT NOT NULL,
        gpu_index INTEGER NOT NULL,
        gi_id INTEGER,
        ci_id INTEGER,
        profile TEXT NOT NULL DEFAULT '',
        placement_start INTEGER,
        placement_size INTEGER,
        state TEXT NOT NULL
            CHECK (state IN ('free', 'leased', 'releasing', 'scrubbing', 'quarantined')),
        clean INTEGER NOT NULL CHECK (clean IN (0, 1)),
        reason TEXT NOT NULL DEFAULT '',
        present INTEGER NOT NULL DEFAULT 1,
        updated_at REAL NOT NULL,
        lease_id TEXT,
        last_lease_id TEXT,
        identity TEXT NOT NULL DEFAULT ''
    );
    INSERT INTO partitions_v10 (uuid, kind, gpu_uuid, gpu_index, gi_id, ci_id, profile,
        placement_start, placement_size, state, clean, reason, present, updated_at, lease_id,
        last_lease_id, identity)
    SELECT uuid, kind, gpu_uuid, gpu_index, gi_id, ci_id, profile, placement_start,
        placement_size, state, clean, reason, present, updated_at, lease_id, last_lease_id,
        identity FROM partitions;
    DROP TABLE partitions;
    ALTER TABLE partitions_v10 RENAME TO partitions;
    """,
)

# Bounds a journal check must stay within at start-up (a few thousand rows on a real node).
