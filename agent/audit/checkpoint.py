"""Signed checkpoints over the audit chain.

A checkpoint says "record ``seq`` of node ``node`` has hash ``head``; my previous checkpoint was
(``prev_seq``, ``prev_head``)", signed with the node's Ed25519 key over
:func:`checkpoint_message`. Kept locally and sent uplink (never dropped), they let a verifier
find a record changed, removed or appended out of order (the chain), and a log cut short (a
checkpoint beyond its end); the previous-checkpoint link lets the controller see a node whose
checkpoint history was rewritten.
"""

from __future__ import annotations

import hashlib
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.identity.node_key import NodeKey
from agent.proto.accelguard.v1 import link_pb2 as pb
from agent.store.audit import Checkpoint, canonical_json

CONTEXT: Final = b"accelguard audit checkpoint v1\n"


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, hex (the scrub certificates' key fingerprint too)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def checkpoint_message(
    node_id: str, seq: int, head_hash: bytes, at: float, prev_seq: int, prev_hash: bytes
) -> bytes:
    body = {
        "node": node_id,
        "seq": seq,
        "head": head_hash.hex(),
        "at": at,
        "prev_seq": prev_seq,
        "prev_head": prev_hash.hex(),
    }
    return CONTEXT + canonical_json(body).encode()


def sign(
    key: NodeKey,
    node_id: str,
    *,
    seq: int,
    head_hash: bytes,
    at: float,
    prev_seq: int,
    prev_hash: bytes,
) -> Checkpoint:
    message = checkpoint_message(node_id, seq, head_hash, at, prev_seq, prev_hash)
    return Checkpoint(
        seq=seq, head_hash=head_hash, at=at, prev_seq=prev_seq, prev_hash=prev_hash,
        key_id=key_id_of(key.public_key()), signature=key.sign(message),
    )  # fmt: skip


def signature_valid(public_key: Ed25519PublicKey, node_id: str, checkpoint: Checkpoint) -> bool:
    message = checkpoint_message(
        node_id, checkpoint.seq, checkpoint.head_hash, checkpoint.at, checkpoint.prev_seq,
        checkpoint.prev_hash,
    )  # fmt: skip
    try:
        public_key.verify(checkpoint.signature, message)
    except InvalidSignature:
        return False
    return True


def to_message(checkpoint: Checkpoint) -> pb.AuditCheckpoint:
    """The checkpoint as the link carries it (an ``audit_checkpoint`` report)."""
    return pb.AuditCheckpoint(
        record_index=checkpoint.seq, chain_hash=checkpoint.head_hash,
        signature=checkpoint.signature, at=checkpoint.at,
        prev_record_index=checkpoint.prev_seq, prev_chain_hash=checkpoint.prev_hash,
        key_id=checkpoint.key_id,
    )  # fmt: skip


def from_message(message: pb.AuditCheckpoint) -> Checkpoint:
    return Checkpoint(
        seq=message.record_index, head_hash=message.chain_hash, at=message.at,
        prev_seq=message.prev_record_index, prev_hash=message.prev_chain_hash,
        key_id=message.key_id, signature=message.signature,
    )  # fmt: skip
