"""The daemon's audit service: the agent's own start and stop, signed checkpoints (kept, and
sent uplink in the same transaction when a controller link exists), rotation within the
configured retention, and a check of the log against its last checkpoint at start-up."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import sqlite3
import time
from collections.abc import Callable
from typing import Final

import structlog

from agent import __version__
from agent.audit import checkpoint as signing
from agent.config import Config
from agent.errors import AccelguardError
from agent.identity.node_key import NodeKey
from agent.proto.accelguard.v1 import link_pb2 as pb
from agent.runtime.executor import BlockingExecutor
from agent.store import Store, audit
from agent.store.audit import Checkpoint
from agent.store.outbox import Outbox

log = structlog.get_logger(__name__)

# How often the service looks whether checkpoint_records new records have piled up.
POLL_S: Final = 1.0


def config_digest(config: Config) -> str:
    """SHA-256 of the effective configuration (every key, defaults included)."""
    text = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class AuditService:
    def __init__(
        self,
        config: Config,
        store: Store,
        executor: BlockingExecutor,
        node_key: NodeKey,
        *,
        outbox: Outbox | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self._config = config
        self._settings = config.audit
        self._store = store
        self._executor = executor
        self._key = node_key
        self._outbox = outbox
        self._wake = wake
        store.audit_max_records = config.audit.max_records if config.audit.enabled else None
        audit.set_enabled(config.audit.enabled)

    # -- start and stop -------------------------------------------------------------------------

    async def started(self, *, journal_lost: bool) -> None:
        """Check the log against its last checkpoint, then record the start."""
        if not self._settings.enabled:
            log.warning("audit_disabled", detail="[audit] enabled = false: nothing is recorded")
            return
        problem = await self._executor.call(self.self_check)
        if problem is not None:
            log.error("audit_log_tampered", problem=problem)
            await self._executor.call(
                lambda: self._store.audit(
                    "audit.tamper_detected", outcome="broken", detail={"problem": problem}
                )
            )
        await self._executor.call(
            lambda: self._store.audit(
                "agent.start",
                detail={
                    "version": __version__,
                    "config_sha256": config_digest(self._config),
                    "journal_lost": journal_lost,
                },
            )
        )

    async def stopping(self) -> None:
        """Record the stop and cover it with a checkpoint (sent when the link next connects)."""
        if not self._settings.enabled:
            return
        await self._executor.call(lambda: self._store.audit("agent.stop"))
        await self._executor.call(self.checkpoint)

    def self_check(self) -> str | None:
        """What is wrong with the log's end against its last local checkpoint, or None."""
        with self._store.transaction() as db:
            last = audit.last_checkpoint(db)
            if last is None:
                return None
            head_seq, _ = audit.head(db)
            if head_seq < last.seq:
                return (
                    f"the log ends at record {head_seq} but checkpoint {last.seq} covers "
                    f"up to {last.seq}: records were removed from its end"
                )
            anchor_seq, anchor_hash = audit.anchor(db)
            if last.seq == anchor_seq:
                found: bytes | None = anchor_hash
            else:
                row = db.execute("SELECT hash FROM audit_log WHERE seq = ?", (last.seq,)).fetchone()
                found = None if row is None else bytes(row[0])
            if found != last.head_hash:
                return f"record {last.seq} is not the record checkpoint {last.seq} signed"
        return None

    # -- checkpoints and rotation -------------------------------------------------------------

    def checkpoint(self) -> Checkpoint | None:
        """Sign the head if it moved since the last checkpoint; store it and, with a link,
        queue it uplink in the same transaction. Blocking (executor thread)."""
        if self._outbox is not None:
            with self._outbox.transaction() as tx:
                made = self._make(tx.db)
                if made is None:
                    return None
                report = pb.Report(audit_checkpoint=signing.to_message(made))
                report_seq = tx.enqueue(
                    "audit_checkpoint", report.SerializeToString(), droppable=False
                )
                tx.db.execute(
                    "UPDATE audit_checkpoints SET report_seq = ? WHERE seq = ?",
                    (report_seq, made.seq),
                )
            if self._wake is not None:
                self._wake()
            return made
        with self._store.transaction() as db:
            return self._make(db)

    def _make(self, db: sqlite3.Connection) -> Checkpoint | None:
        seq, head_hash = audit.head(db)
        last = audit.last_checkpoint(db)
        prev_seq, prev_hash = (last.seq, last.head_hash) if last else (0, audit.GENESIS)
        if seq <= prev_seq:
            return None
        made = signing.sign(
            self._key, self._config.node.id, seq=seq, head_hash=head_hash, at=time.time(),
            prev_seq=prev_seq, prev_hash=prev_hash,
        )  # fmt: skip
        audit.add_checkpoint(db, made)
        return made

    def tick(self, due: bool) -> Checkpoint | None:
        """One look: a checkpoint when ``due`` (the interval passed) and there is anything new,
        or when checkpoint_records new records piled up; rotation when due or after one."""
        with self._store.transaction() as db:
            seq, _ = audit.head(db)
            last = audit.last_checkpoint(db)
        pending = seq - (last.seq if last else 0)
        made = None
        if pending > 0 and (due or pending >= self._settings.checkpoint_records):
            made = self.checkpoint()
        if due or made is not None:
            self.rotate()
        return made

    def rotate(self) -> int:
        keep_after = time.time() - self._settings.keep_days * 86400
        with self._store.transaction() as db:
            removed = audit.rotate(
                db, keep_records=self._settings.keep_records, keep_after=keep_after
            )
        if removed:
            log.info("audit_rotated", removed=removed)
        return removed

    async def run(self) -> None:
        if not self._settings.enabled:
            return
        next_due = time.monotonic() + self._settings.checkpoint_interval_s
        while True:
            await asyncio.sleep(POLL_S)
            due = time.monotonic() >= next_due
            if due:
                next_due = time.monotonic() + self._settings.checkpoint_interval_s
            try:
                await self._executor.call(self.tick, due)
            except AccelguardError as error:
                # A full outbox or a journal error: the records stay, the next look retries.
                log.warning("audit_checkpoint_failed", error=str(error))
