"""Signed command envelopes (docs/commands.md): signing at the controller, checking at the node.

The signature is Ed25519 over ``COMMAND_CONTEXT || envelope``, the envelope being the exact
serialized ``CommandEnvelope`` bytes that travel (never a re-encoding), so it is authentic over
any transport, apart from TLS. The context string keeps a command signature from ever being
valid as anything else the key might sign.

:func:`check_command` runs the node's checks in the documented order and raises
:class:`~agent.errors.CommandRefusedError` with the reason code of the first that fails; the
replay cache (the journal) is the caller's last check. Arbitrary bytes never raise anything else
(tests/link/test_command_fuzz.py).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import CommandRefusedError, LinkProtocolError
from agent.link.wire import validate_command_body
from agent.proto.accelguard.v1 import link_pb2 as pb

COMMAND_CONTEXT: Final = b"accelguard-command-v1\x00"
# A command, signature included, is small: a layout is the largest body.
MAX_COMMAND_BYTES: Final = 64 << 10
MAX_TTL_S: Final = 600.0
COMMAND_ID_BYTES: Final = 16
SIGNATURE_BYTES: Final = 64
DEFAULT_CLOCK_SKEW_S: Final = 30.0


class RefusalReason(StrEnum):
    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    SIGNATURE = "signature"
    UNKNOWN_KEY = "unknown_key"
    WRONG_NODE = "wrong_node"
    FUTURE = "future"
    EXPIRED = "expired"
    REPLAYED = "replayed"
    UNKNOWN_BODY = "unknown_body"
    CORDONED = "cordoned"


def command_key_id(key: Ed25519PublicKey) -> str:
    """The key's id in envelopes: the first 16 bytes of SHA-256 over its raw 32 bytes, hex."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


def load_command_public_key(pem: bytes | str, what: str) -> Ed25519PublicKey:
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnicodeError) as error:
        raise LinkProtocolError(f"{what}: not a PEM public key: {error}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise LinkProtocolError(f"{what}: not an Ed25519 key")
    return key


def public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


@dataclass(frozen=True)
class CommandKey:
    """The controller's signing key and its id."""

    private: Ed25519PrivateKey

    @property
    def key_id(self) -> str:
        return command_key_id(self.private.public_key())


def new_envelope(node_id: str, ttl_s: float, now: float | None = None) -> pb.CommandEnvelope:
    if not 0 < ttl_s <= MAX_TTL_S:
        raise LinkProtocolError(f"a command lives 0 to {MAX_TTL_S:.0f} s, not {ttl_s!r}")
    issued = time.time() if now is None else now
    return pb.CommandEnvelope(
        command_id=os.urandom(COMMAND_ID_BYTES),
        node_id=node_id,
        issued_at=issued,
        not_after=issued + ttl_s,
    )


def sign_command(key: CommandKey, envelope: pb.CommandEnvelope) -> pb.SignedCommand:
    envelope.key_id = key.key_id
    data = envelope.SerializeToString()
    return pb.SignedCommand(envelope=data, signature=key.private.sign(COMMAND_CONTEXT + data))


@dataclass(frozen=True)
class CheckedCommand:
    envelope: pb.CommandEnvelope
    kind: str


def claimed_id(data: bytes) -> bytes:
    """The command id the bytes claim, for the refusal report (unauthenticated: a label only)."""
    try:
        signed = pb.SignedCommand.FromString(bytes(data[:MAX_COMMAND_BYTES]))
        envelope = pb.CommandEnvelope.FromString(signed.envelope)
    except Exception:  # noqa: BLE001 - garbage has no id; any parse failure means that
        return b""
    return bytes(envelope.command_id[:COMMAND_ID_BYTES])


def check_command(
    data: bytes,
    keys: Mapping[str, Ed25519PublicKey],
    node_id: str,
    *,
    now: float,
    clock_skew_s: float = DEFAULT_CLOCK_SKEW_S,
) -> CheckedCommand:
    """The node's checks before the replay cache, in order: size and decode, signature by a
    pinned key, this node, not issued in the future, not expired, a body this node knows."""

    def refuse(reason: RefusalReason, message: str, command_id: bytes = b"") -> CommandRefusedError:
        return CommandRefusedError(reason, f"command refused ({reason}): {message}", command_id)

    if len(data) > MAX_COMMAND_BYTES:
        raise refuse(
            RefusalReason.OVERSIZED, f"{len(data)} bytes, over the {MAX_COMMAND_BYTES} limit"
        )
    try:
        signed = pb.SignedCommand.FromString(bytes(data))
        envelope = pb.CommandEnvelope.FromString(signed.envelope)
    except Exception as error:  # noqa: BLE001 - DecodeError, upb's RuntimeError on deep nesting
        raise refuse(RefusalReason.MALFORMED, f"not a signed command envelope: {error}") from None
    command_id = bytes(envelope.command_id[:COMMAND_ID_BYTES])
    if len(envelope.command_id) != COMMAND_ID_BYTES:
        raise refuse(RefusalReason.MALFORMED, f"command_id must be {COMMAND_ID_BYTES} bytes")
    key = keys.get(envelope.key_id)
    if key is None:
        raise refuse(
            RefusalReason.UNKNOWN_KEY,
            f"signed with key {envelope.key_id[:64]!r}, not a command key this node pinned",
            command_id,
        )
    try:
        if len(signed.signature) != SIGNATURE_BYTES:
            raise InvalidSignature  # noqa: TRY301 - one path for every bad signature
        key.verify(signed.signature, COMMAND_CONTEXT + signed.envelope)
    except InvalidSignature:
        raise refuse(
            RefusalReason.SIGNATURE,
            "the signature does not verify with the pinned command key (altered, or not "
            "signed by the controller)",
            command_id,
        ) from None
    if envelope.node_id != node_id:
        raise refuse(
            RefusalReason.WRONG_NODE,
            f"addressed to node {envelope.node_id[:64]!r}, this is {node_id!r}",
            command_id,
        )
    issued, not_after = envelope.issued_at, envelope.not_after
    if not (math.isfinite(issued) and math.isfinite(not_after)):
        raise refuse(RefusalReason.MALFORMED, "issued_at and not_after must be finite", command_id)
    if issued > now + clock_skew_s:
        raise refuse(
            RefusalReason.FUTURE,
            f"issued {issued - now:.1f} s in the future (allowed clock skew {clock_skew_s:.0f} s)",
            command_id,
        )
    if not_after - issued > MAX_TTL_S or not_after < issued:
        raise refuse(
            RefusalReason.MALFORMED,
            f"not_after must be 0 to {MAX_TTL_S:.0f} s after issued_at",
            command_id,
        )
    # Expiry is strict (the skew only forgives a controller clock ahead of ours): the replay
    # cache forgets an id once its not_after has passed, and this check refuses it from then on.
    if now > not_after:
        raise refuse(RefusalReason.EXPIRED, f"expired {now - not_after:.1f} s ago", command_id)
    if envelope.WhichOneof("body") is None:
        raise refuse(
            RefusalReason.UNKNOWN_BODY,
            "no body this node knows (the closed set is in docs/commands.md)",
            command_id,
        )
    try:
        kind = validate_command_body(envelope)
    except LinkProtocolError as error:
        raise refuse(RefusalReason.MALFORMED, str(error), command_id) from None
    return CheckedCommand(envelope, kind)
