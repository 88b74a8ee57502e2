"""One-time bootstrap tokens: ``agt1.<id>.<secret>``, bound to one node id.

The controller keeps only the SHA-256 of the secret: its database leaks no usable token. A token
is used up by the enrollment it admits (in the same transaction as the node record).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from typing import Final

from agent.controller.store import ControllerStore, TokenRecord
from agent.errors import EnrollmentRefusedError, LinkProtocolError, ValidationError
from agent.identity.spiffe import check_node_id

PREFIX: Final = "agt1"
_FORMAT: Final = re.compile(r"agt1\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})")
MAX_TTL_S: Final = 30 * 24 * 3600.0


def create_token(store: ControllerStore, node_id: str, ttl_s: float) -> tuple[str, float]:
    try:
        check_node_id(node_id)
    except LinkProtocolError as error:
        raise ValidationError(str(error)) from None
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValidationError(f"token ttl must be in (0, {MAX_TTL_S:.0f}] seconds, not {ttl_s}")
    token_id = secrets.token_hex(8)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode("ascii").rstrip("=")
    expires_at = time.time() + ttl_s
    store.create_token(token_id, node_id, hashlib.sha256(secret.encode()).digest(), expires_at)
    return f"{PREFIX}.{token_id}.{secret}", expires_at


def check_token(store: ControllerStore, token: str, now: float | None = None) -> TokenRecord:
    """The token's record if it may enroll now; EnrollmentRefusedError saying why not."""
    match = _FORMAT.fullmatch(token)
    if match is None:
        raise EnrollmentRefusedError("bootstrap token is malformed (expected agt1.<id>.<secret>)")
    record = store.token(match.group(1))
    digest = hashlib.sha256(match.group(2).encode()).digest()
    if record is None or not hmac.compare_digest(record.secret_sha256, digest):
        raise EnrollmentRefusedError("bootstrap token is not known to this controller")
    if record.used_at is not None:
        raise EnrollmentRefusedError(
            f"bootstrap token {record.id} was already used (one-time); create a new one with "
            "`accelguard ctl token create`"
        )
    if (now or time.time()) >= record.expires_at:
        raise EnrollmentRefusedError(f"bootstrap token {record.id} has expired")
    return record
