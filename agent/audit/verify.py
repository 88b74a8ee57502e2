"""Verify an audit log: recompute the chain and check every checkpoint against it.

What it tells apart, each with its own finding (``kind``) and message:

* ``edited``: a record whose content no longer hashes to its stored hash;
* ``swapped``: two neighbours exchanged (each hashes correctly under the other's seq);
* ``deleted``: a gap in the sequence numbers;
* ``broken_link``: a record that does not name its predecessor's hash (rows rewritten);
* ``rewritten``: the chain is self-consistent but a signed checkpoint says otherwise (records
  recomputed after an edit);
* ``truncated``: the log ends before a checkpoint's record (local or the controller's);
* ``bad_signature``: a checkpoint not signed by this node's key;
* ``checkpoint_mismatch`` / ``checkpoint_chain``: a local checkpoint that differs from the
  controller's copy, or that does not follow the one before it.

The first finding by seq is the answer to "where was it broken"; all are listed.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.audit.checkpoint import key_id_of, signature_valid
from agent.errors import ValidationError
from agent.store import audit
from agent.store.audit import AuditRecord, Checkpoint, chain_hash, content_bytes

# A checkpoints file from the controller: bounded before it is parsed.
MAX_CHECKPOINTS_FILE_BYTES: Final = 64 << 20


@dataclass(frozen=True)
class Finding:
    kind: str
    seq: int
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "seq": self.seq, "message": self.message}


@dataclass
class VerifyReport:
    first_seq: int = 0
    last_seq: int = 0
    records: int = 0
    checkpoints: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def first(self) -> Finding | None:
        return min(self.findings, key=lambda f: f.seq) if self.findings else None

    def to_dict(self) -> dict[str, Any]:
        first = self.first()
        return {
            "ok": self.ok,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "records": self.records,
            "checkpoints": self.checkpoints,
            "first_problem": first.to_dict() if first else None,
            "findings": [f.to_dict() for f in sorted(self.findings, key=lambda f: f.seq)],
        }


def _hash_as(record: AuditRecord, seq: int, prev_hash: bytes) -> bytes:
    content = content_bytes(
        seq, record.at, record.actor, record.action, record.outcome, record.lease_id,
        record.partition_uuid, record.detail,
    )  # fmt: skip
    return chain_hash(prev_hash, content)


def _start(db: sqlite3.Connection, from_seq: int) -> tuple[int, bytes]:
    """(seq, hash) the verification starts after."""
    anchor_seq, anchor_hash = audit.anchor(db)
    if from_seq <= anchor_seq + 1:
        return anchor_seq, anchor_hash
    row = db.execute("SELECT hash FROM audit_log WHERE seq = ?", (from_seq - 1,)).fetchone()
    if row is None:
        raise ValidationError(f"--from {from_seq}: record {from_seq - 1} is not in the log")
    return from_seq - 1, bytes(row[0])


def verify_chain(
    db: sqlite3.Connection, report: VerifyReport, from_seq: int = 0
) -> dict[int, bytes]:
    """Walk the records; the hash of every record that checked out (by seq), up to the first
    problem, which is added to ``report``."""
    prev_seq, prev_hash = _start(db, from_seq)
    good: dict[int, bytes] = {prev_seq: prev_hash}
    report.first_seq = prev_seq + 1
    pending: AuditRecord | None = None
    stream = audit.records(db, from_seq=prev_seq + 1)
    for record in stream:
        report.records += 1
        report.last_seq = record.seq
        if pending is not None:
            continue  # counting the rest only
        expected = prev_seq + 1
        if record.seq != expected:
            missing = (
                f"record {expected} is" if record.seq == expected + 1
                else f"records {expected} to {record.seq - 1} are"
            )  # fmt: skip
            report.findings.append(
                Finding("deleted", expected, f"{missing} missing: the log goes from "
                        f"record {prev_seq} to record {record.seq}")
            )  # fmt: skip
            pending = record
            continue
        if record.prev_hash == prev_hash and _hash_as(record, record.seq, prev_hash) == record.hash:
            prev_seq, prev_hash = record.seq, record.hash
            good[record.seq] = record.hash
            continue
        following = next(iter(audit.records(db, from_seq=record.seq + 1, limit=1)), None)
        if _swapped(record, following, prev_hash):
            report.findings.append(
                Finding("swapped", record.seq, f"records {record.seq} and {record.seq + 1} "
                        "were swapped: each is the other's, in the chain's order")
            )  # fmt: skip
        elif record.prev_hash == prev_hash:
            report.findings.append(
                Finding("edited", record.seq, f"record {record.seq} was changed after it was "
                        "written: its content does not hash to its stored hash")
            )  # fmt: skip
        else:
            report.findings.append(
                Finding("broken_link", record.seq, f"record {record.seq} does not follow "
                        f"record {prev_seq}: it names another predecessor hash")
            )  # fmt: skip
        pending = record
    return good


def _swapped(record: AuditRecord, following: AuditRecord | None, prev_hash: bytes) -> bool:
    if following is None or following.seq != record.seq + 1:
        return False
    return (
        following.prev_hash == prev_hash
        and _hash_as(following, record.seq, prev_hash) == following.hash
        and record.prev_hash == following.hash
        and _hash_as(record, following.seq, following.hash) == record.hash
    )


def verify_checkpoints(
    db: sqlite3.Connection,
    report: VerifyReport,
    good: dict[int, bytes],
    public_key: Ed25519PublicKey,
    node_id: str,
    external: Iterable[Checkpoint] = (),
) -> None:
    local = {checkpoint.seq: checkpoint for checkpoint in audit.checkpoints(db)}
    theirs = {checkpoint.seq: checkpoint for checkpoint in external}
    key_id = key_id_of(public_key)
    anchor_seq, _ = audit.anchor(db)
    head_seq, _ = audit.head(db)
    chain_ok = not report.findings
    beyond: tuple[int, str] | None = None
    for seq in sorted(local.keys() | theirs.keys()):
        mine, other = local.get(seq), theirs.get(seq)
        checkpoint = other if other is not None else mine
        if checkpoint is None:  # pragma: no cover - seq comes from one of the two
            continue
        report.checkpoints += 1
        where = "the controller's checkpoint" if other is not None else "checkpoint"
        if (
            mine is not None
            and other is not None
            and (mine.head_hash != other.head_hash or mine.signature != other.signature)
        ):
            report.findings.append(
                Finding("checkpoint_mismatch", seq, f"the local checkpoint {seq} differs from "
                        "the controller's copy")
            )  # fmt: skip
        for candidate, label in ((mine, "checkpoint"), (other, "the controller's checkpoint")):
            if candidate is not None and not signature_valid(public_key, node_id, candidate):
                report.findings.append(
                    Finding("bad_signature", seq, f"{label} {seq} is not signed by this node's "
                            f"key (it names key {candidate.key_id[:16]}…, the node key is "
                            f"{key_id[:16]}…)")
                )  # fmt: skip
        if seq > head_seq:
            beyond = (seq, where)  # the newest one names the most that is missing
        elif seq >= anchor_seq and seq in good and good[seq] != checkpoint.head_hash:
            report.findings.append(
                Finding("rewritten", seq, f"record {seq} is not the record {where} {seq} "
                        "signed: the records up to it were rewritten")
            )  # fmt: skip
        elif seq >= anchor_seq and seq not in good and chain_ok and seq >= report.first_seq:
            report.findings.append(
                Finding("rewritten", seq, f"{where} {seq} names a record the log does not have")
            )  # fmt: skip
    if beyond is not None:
        seq, where = beyond
        report.findings.append(
            Finding("truncated", head_seq + 1, f"the log ends at record {head_seq} but {where} "
                    f"{seq} covers records up to {seq}: records {head_seq + 1} to {seq} were "
                    "removed")
        )  # fmt: skip
    ordered = sorted(local.values(), key=lambda c: c.seq)
    for before, after in itertools.pairwise(ordered):
        if after.prev_seq != before.seq or after.prev_hash != before.head_hash:
            report.findings.append(
                Finding("checkpoint_chain", after.seq, f"checkpoint {after.seq} does not follow "
                        f"checkpoint {before.seq} (it names checkpoint {after.prev_seq})")
            )  # fmt: skip


def verify(
    db: sqlite3.Connection,
    public_key: Ed25519PublicKey,
    node_id: str,
    *,
    from_seq: int = 0,
    external: Iterable[Checkpoint] = (),
) -> VerifyReport:
    report = VerifyReport()
    good = verify_chain(db, report, from_seq)
    verify_checkpoints(db, report, good, public_key, node_id, external)
    return report


def checkpoint_history(
    received: Iterable[Checkpoint], public_key: Ed25519PublicKey, node_id: str
) -> list[Finding]:
    """The controller's side: checkpoints in the order they arrived must be signed by the
    node's key, go forward, and each name the one before it. A node whose log was cut short
    (or restored from an old backup) and goes on checkpointing shows up here as going back or
    as a fork, even when its own copy of the checkpoints was cut too."""
    findings: list[Finding] = []
    last: Checkpoint | None = None
    for checkpoint in received:
        if not signature_valid(public_key, node_id, checkpoint):
            findings.append(
                Finding("bad_signature", checkpoint.seq, f"checkpoint {checkpoint.seq} is not "
                        "signed by the node's enrolled key")
            )  # fmt: skip
            continue
        if last is not None and checkpoint.seq <= last.seq:
            findings.append(
                Finding("truncated", checkpoint.seq, f"checkpoint {checkpoint.seq} arrived after "
                        f"checkpoint {last.seq}: the node's audit log went back (records after "
                        f"{checkpoint.prev_seq} were removed or replaced)")
            )  # fmt: skip
        elif last is not None and (
            checkpoint.prev_seq != last.seq or checkpoint.prev_hash != last.head_hash
        ):
            findings.append(
                Finding("fork", checkpoint.seq, f"checkpoint {checkpoint.seq} follows checkpoint "
                        f"{checkpoint.prev_seq}, but the last one received was {last.seq}: the "
                        "node's checkpoints were rewritten")
            )  # fmt: skip
        if last is None or checkpoint.seq > last.seq:
            last = checkpoint
    return findings


def load_checkpoints_file(data: bytes, node_id: str) -> list[Checkpoint]:
    """The controller's checkpoints of this node (``ctl audit checkpoints --node ID --json``)."""
    if len(data) > MAX_CHECKPOINTS_FILE_BYTES:
        raise ValidationError(f"checkpoints file: larger than {MAX_CHECKPOINTS_FILE_BYTES} bytes")
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValidationError(f"checkpoints file: not JSON ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("checkpoints"), list):
        raise ValidationError("checkpoints file: expected an object with a 'checkpoints' list")
    if document.get("node") != node_id:
        raise ValidationError(
            f"checkpoints file: it is node {str(document.get('node'))[:128]!r}'s, not {node_id!r}'s"
        )
    found = []
    for index, item in enumerate(document["checkpoints"]):
        try:
            found.append(
                Checkpoint(
                    seq=_integer(item["seq"]),
                    head_hash=bytes.fromhex(item["head_hash"]),
                    at=float(item["at"]),
                    prev_seq=_integer(item["prev_seq"]),
                    prev_hash=bytes.fromhex(item["prev_hash"]),
                    key_id=str(item["key_id"]),
                    signature=bytes.fromhex(item["signature"]),
                )
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValidationError(f"checkpoints file: checkpoint {index}: {error}") from None
    return found


def _integer(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 63:
        raise ValueError(f"{value!r} is not a record number")
    return value
