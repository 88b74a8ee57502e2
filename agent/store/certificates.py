"""Scrub certificates in the journal: stored whole, named in the audit log by their digest."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from typing import Any

from agent.store.audit import canonical_json


def certificate_digest(document: dict[str, Any]) -> str:
    """SHA-256 of a scrub certificate's canonical JSON (what the audit log names)."""
    return hashlib.sha256(canonical_json(document).encode()).hexdigest()


def insert_certificate(
    db: sqlite3.Connection,
    partition_uuid: str,
    lease_id: str | None,
    verified: bool,
    document: dict[str, Any],
) -> int:
    cursor = db.execute(
        "INSERT INTO certificates (partition_uuid, lease_id, verified, issued_at, document) "
        "VALUES (?, ?, ?, ?, ?)",
        (partition_uuid, lease_id, int(verified), time.time(), json.dumps(document)),
    )
    return int(cursor.lastrowid or 0)
