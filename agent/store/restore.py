"""Restoring a checked backup (agent/store/backup.py) on a stopped agent: ``state import``.

Invariants:

* "This node" (:func:`check_node`) is the holder of the node key in the state directory; a node
  without one (wiped, or new) is its configured node id. A file of another node is refused
  unless the operator forces it.
* The restored journal fails closed (:func:`prepare_journal`). It may be older than what tenants
  did since, so every partition not under a live lease in it is dirty (scrubbed before its next
  grant; a quarantine keeps its reason). Live leases stay: the agent's start-up reconciliation
  re-asserts their fences (or retires the lease when its cgroup or partition is gone). The link
  outbox gets a new epoch: the controller keys reports by (node, epoch, seq) and answers a Hello
  with the highest seq it holds for the epoch, which for the old epoch is beyond the restored
  outbox (the node would refuse it) or, worse, would make the controller drop the restored seqs
  as duplicates. Acked reports are dropped (the controller has them); unacked ones are sent again
  under the new epoch (a duplicate beats a lost scrub certificate). ``meta`` records
  ``restored_from_backup_at`` and ``restored_at``.
* The journal stays a journal the agent does not take for a lost one (it has a schema, so
  ``Store.created`` is false), while a real loss stays visible: until the commit below the
  previous journal is in place, or (only when its WAL could not be merged) none at all, which
  the agent treats as lost, the node key being older (everything quarantined).
* The swap (:func:`install`) keeps every replaced file under ``aside`` and has one commit point,
  the rename of the restored journal over agent.db; identity files are each replaced by a rename
  before it. A crash at any step leaves either journal whole, never a mixture; the import can be
  run again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.errors import StoreError, ValidationError
from agent.runtime.files import fsync_path as fsync
from agent.store import audit, put_meta, write_transaction
from agent.store.backup import (
    CheckedBackup,
    Manifest,
    check_integrity,
    live_leases_sql,
    open_copy,
    read_container,
    table_names,
    utc,
)
from agent.store.migrations import MIGRATIONS

# The crash-test hook's step names, in order (tests/leases/test_state_backup.py).
RESTORE_STEPS: Final = ("journal-aside", "identity", "journal")


def open_backup(path: Path, staging_parent: Path) -> CheckedBackup:
    """Read and check the whole file (agent/store/backup.py), then the journal in it: it opens,
    passes integrity_check, has a schema version this agent can migrate from and the schema
    this agent's migrations made at that version. Nothing outside ``staging_parent``'s new
    private directory is written; a refusal removes that too."""
    checked = read_container(path, staging_parent)
    try:
        check_journal(checked)
    except BaseException:
        checked.discard()
        raise
    return checked


def check_journal(checked: CheckedBackup) -> None:
    manifest, where = checked.manifest, checked.source
    known = len(MIGRATIONS)
    if manifest.journal_schema_version > known:
        raise ValidationError(
            f"{where}: its journal has schema version {manifest.journal_schema_version}, newer "
            f"than this agent knows ({known}); import it with agent {manifest.agent_version} or "
            "newer: nothing was changed"
        )
    try:
        db = open_copy(checked.journal)
        try:
            check_integrity(db)
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version != manifest.journal_schema_version or version < 1:
                raise ValidationError(
                    f"{where}: its journal has schema version {version}, its manifest says "
                    f"{manifest.journal_schema_version}"
                )
            found, wanted = _schema(db), _reference_schema(version)
            if found != wanted:
                odd = sorted({*found.items()} ^ {*wanted.items()})[:3]
                names = ", ".join(f"{kind} {name}" for (kind, name), _ in odd)
                raise ValidationError(
                    f"{where}: its journal's schema is not one this agent made (differs at "
                    f"{names}): nothing was changed"
                )
        finally:
            db.close()
    except StoreError as error:
        raise ValidationError(
            f"{where}: its journal is damaged ({error}): nothing was changed"
        ) from error
    except sqlite3.Error as error:
        detail = " ".join(str(error).split())
        raise ValidationError(
            f"{where}: its journal is not a usable SQLite database ({detail})"
        ) from error


def _schema(db: sqlite3.Connection) -> dict[tuple[str, str], str]:
    """Every schema object, with what defines it: columns of tables and indexes (SQLite
    rewrites the SQL text of altered tables, differently across versions), the SQL of the
    rest."""
    found: dict[tuple[str, str], str] = {}
    rows = db.execute("SELECT type, name, tbl_name, sql FROM sqlite_schema").fetchall()
    for kind, name, table, sql in rows:
        if str(name).startswith("sqlite_stat"):
            continue
        if kind == "table":
            detail = db.execute("SELECT * FROM pragma_table_xinfo(?)", (name,)).fetchall()
        elif kind == "index":
            detail = db.execute("SELECT * FROM pragma_index_xinfo(?)", (name,)).fetchall()
        else:
            detail = [sql]
        found[(str(kind), str(name))] = json.dumps([table, detail], default=str)
    return found


def _reference_schema(version: int) -> dict[tuple[str, str], str]:
    reference = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for step in range(version):
            reference.executescript(
                f"BEGIN;\n{MIGRATIONS[step]}\nPRAGMA user_version = {step + 1};\nCOMMIT;"
            )
        return _schema(reference)
    finally:
        reference.close()


def check_node(manifest: Manifest, source: Path, node_id: str, node_public_key: str | None,
               *, force: bool) -> str:  # fmt: skip
    """Whether the file is this node's; "this node" is its node key when it has one, else (a
    wiped or new node) its configured id. Returns what matched, or what --force overrode."""
    if node_public_key is not None:
        basis = "node key"
        same = manifest.node_public_key == node_public_key
        theirs = _fingerprint(manifest.node_public_key) if manifest.node_public_key else "none"
        detail = (f"the file is of node {manifest.node_id!r} with node key {theirs}; this "
                  f"node's key is {_fingerprint(node_public_key)}")  # fmt: skip
    else:
        basis = "node id"
        same = manifest.node_id == node_id
        detail = (f"the file is of node {manifest.node_id!r}; this node has no node key yet and "
                  f"its id is {node_id!r}")  # fmt: skip
    if same:
        return f"same {basis}"
    if not force:
        raise ValidationError(
            f"{source} is a backup of another node ({detail}); pass --force to import it "
            "anyway: nothing was changed"
        )
    return f"another node's backup, imported with --force: {detail}"


def _fingerprint(public_pem: str) -> str:
    return "SHA256:" + hashlib.sha256(public_pem.encode()).hexdigest()[:16]


# -- fail closed: the restored journal ------------------------------------------------------------


@dataclass(frozen=True)
class Restored:
    marked_dirty: int
    live_leases: int
    outbox_kept: int
    outbox_dropped: int
    old_epoch: int | None
    new_epoch: int | None


def prepare_journal(checked: CheckedBackup, now: float) -> Restored:
    """Make the staged journal safe to start on: every partition not under a live lease dirty,
    the acked outbox rows gone and a new link epoch (see the module's docstring)."""
    reason = f"restored from a backup of {utc(checked.manifest.exported_at)}: memory state unknown"
    try:
        db = open_copy(checked.journal)
        try:
            db.execute("PRAGMA journal_mode=DELETE")
            db.execute("PRAGMA synchronous=FULL")
            tables = table_names(db)
            with write_transaction(db, "restored journal"):
                live: set[str] = set()
                if "leases" in tables:
                    query = f"SELECT partition_uuid FROM leases WHERE state IN {live_leases_sql()}"  # noqa: S608 - constants
                    live = {str(row[0]) for row in db.execute(query)}
                marked = 0
                for (uuid,) in db.execute("SELECT uuid FROM partitions").fetchall():
                    held = uuid in live
                    marked += not held
                    db.execute(
                        "UPDATE partitions SET clean = 0, updated_at = ?, reason = CASE "
                        "WHEN state = 'quarantined' OR ? THEN reason ELSE ? END WHERE uuid = ?",
                        (now, int(held), reason, uuid),
                    )
                kept = dropped = 0
                if "link_outbox" in tables:
                    # Acked: the controller holds them under the old epoch. Unacked: it may not;
                    # they go again under the new one (a duplicate beats a lost certificate).
                    dropped = db.execute(
                        "DELETE FROM link_outbox WHERE acked_at IS NOT NULL"
                    ).rowcount
                    kept = int(db.execute("SELECT COUNT(*) FROM link_outbox").fetchone()[0])
                row = db.execute("SELECT value FROM meta WHERE key = 'link_epoch'").fetchone()
                old = new = None
                if row is not None:
                    with contextlib.suppress(ValueError):
                        old = int(row[0])
                    # A fresh sequence space, made as the outbox makes one (agent/store/outbox.py).
                    new = old
                    while new in (old, 0):
                        new = secrets.randbits(63)
                    put_meta(db, "link_epoch", str(new))
                put_meta(db, "restored_from_backup_at", repr(checked.manifest.exported_at))
                put_meta(db, "restored_at", repr(now))
                if "audit_log" in tables:
                    # The chain goes on from the backup's last record; what the node recorded
                    # after the export is gone with the state it described (the controller's
                    # checkpoints still show it existed: docs/audit.md).
                    audit.append(
                        db, "state.imported", outcome="restored",
                        detail={"exported_at": checked.manifest.exported_at,
                                "partitions_marked_dirty": marked, "live_leases": len(live),
                                "link_epoch": new},
                        actor=audit.Actor("operator", uid=os.getuid(), gid=os.getgid(),
                                          pid=os.getpid()),
                    )  # fmt: skip
        finally:
            db.close()
        fsync(checked.journal)
    except (sqlite3.Error, OSError) as error:
        raise StoreError(f"cannot prepare the restored journal: {error}") from error
    return Restored(marked, len(live), kept, dropped, old, new)


# -- the swap -------------------------------------------------------------------------------------


def install(
    checked: CheckedBackup,
    journal: Path,
    identity: Mapping[Path, bytes] | None,
    identity_paths: Sequence[Path],
    aside: Path,
    after_step: Callable[[str], None] | None = None,
) -> list[Path]:
    """Put the checked backup in place; the previous files are kept under ``aside``.

    Order: the current journal's WAL is merged into it; the journal is linked aside (it stays in
    place, complete); the identity files are each replaced by a rename; then the one commit
    point, the rename of the restored journal over agent.db. Only where the WAL could not be
    merged (a damaged journal) is the old journal removed first: until the commit the agent then
    finds no journal and quarantines everything (the node key is older than the journal)."""
    step = after_step or _no_hook
    kept: list[Path] = []
    try:
        merged = _merge_wal(journal)
        aside.mkdir(mode=0o700, parents=True)
        if journal.exists():
            kept.append(_keep(journal, aside / journal.name))
            if not merged:
                journal.unlink()
        for suffix in ("-wal", "-shm"):
            extra = journal.with_name(journal.name + suffix)
            if extra.exists():
                extra.rename(aside / extra.name)
                kept.append(aside / extra.name)
        fsync(journal.parent)
        step(RESTORE_STEPS[0])
        if identity is not None:
            for path in identity_paths:
                present = path.exists() or path.is_symlink()
                if present:
                    kept.append(_keep(path, aside / "identity" / path.name))
                content = identity.get(path)
                if content is not None:
                    _replace_private(path, content)
                elif present:
                    path.unlink()
                if present or content is not None:
                    fsync(path.parent)
        step(RESTORE_STEPS[1])
        checked.journal.replace(journal)
        fsync(journal.parent)
        step(RESTORE_STEPS[2])
        if not kept:
            aside.rmdir()  # nothing was there to keep (a wiped state directory)
    except OSError as error:
        raise StoreError(
            f"the import stopped half-way ({error.filename}: {error.strerror}); the previous state "
            f"is kept in {aside}; run the import again"
        ) from error
    finally:
        checked.discard()
    return kept


def remove_leftovers(directories: Sequence[Path]) -> None:
    """Staging files of an import that crashed (run under the state-directory lock)."""
    for directory in directories:
        for leftover in directory.glob(".import-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in directory.glob(".*.import-*.tmp"):
            leftover.unlink(missing_ok=True)


def _no_hook(step: str) -> None:
    """No crash test is watching."""


def _merge_wal(journal: Path) -> bool:
    """Checkpoint the current journal so that its file alone holds it; False if a WAL is left."""
    wal = journal.with_name(journal.name + "-wal")
    if journal.exists() and wal.exists():
        with contextlib.suppress(sqlite3.Error):
            db = sqlite3.connect(f"file:{journal}?mode=rw", uri=True, isolation_level=None)
            try:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                db.close()
    return not wal.exists() or wal.stat().st_size == 0


def _keep(path: Path, target: Path) -> Path:
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.link(path, target, follow_symlinks=False)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        shutil.copy2(path, target, follow_symlinks=False)
        fsync(target)
    return target


def _replace_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.import-{os.getpid()}.tmp")
    descriptor = os.open(
        temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    temporary.replace(path)
