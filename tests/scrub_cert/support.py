"""A realistic scrub to certify: multi-pass on a MIG partition, with awkward strings."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

from agent.identity.node_key import NodeKey
from agent.scrub.certificate import SIGNATURE_CONTEXT, canonical_json, issue_certificate
from agent.scrub.model import POLICY_PATTERNS, PassResult, ScrubResult, ScrubTarget

STARTED = datetime(2025, 3, 14, 15, 9, 26, 535897, tzinfo=UTC)
FINISHED = datetime(2025, 3, 14, 15, 9, 41, 123456, tzinfo=UTC)

TARGET = ScrubTarget(
    partition_uuid="3f1c9a52-7d0e-4b8e-9a61-0c2d5e7f8a90",
    gpu_uuid="GPU-5a7b3c1d-2e4f-6a8b-9c0d-1e2f3a4b5c6d",
    gpu_index=0,
    kind="mig",
    visible_device="MIG-0e1d2c3b-4a59-6877-8695-a4b3c2d1e0f9",
    total_bytes=10_468_982_784,
)


def scrub_result(mismatched_bytes: int = 0, policy: str = "multi-pass") -> ScrubResult:
    passes = tuple(
        PassResult(
            pattern=pattern,
            bytes_written=10_301_210_624,
            bytes_verified=10_301_210_624,
            write_seconds=0.004_512_5,
            verify_seconds=0.003_100_7,
            mismatched_bytes=mismatched_bytes if pattern == 0 else 0,
        )
        for pattern in POLICY_PATTERNS[policy]
    )
    return ScrubResult(
        backend="cuda",
        policy=policy,
        total_bytes=TARGET.total_bytes,
        passes=passes,
        detail="NVIDIA H100 80GB HBM3 MIG 1g.10gb; shared memory: 16 of 16 SMs — cleared",
    )


def certify(key: NodeKey, result: ScrubResult | None = None) -> dict[str, Any]:
    return issue_certificate(
        key,
        node_id="node-eu-west-17",
        target=TARGET,
        gpu_serial="1654922003456",
        previous_lease_id="lease-000241",
        previous_tenant='tenant-ünïcode "quoted" \\ and\ttab',
        result=result or scrub_result(),
        started_at=STARTED,
        finished_at=FINISHED,
    )


def resign(key: NodeKey, payload: dict[str, Any]) -> dict[str, Any]:
    """A document whose signature over ``payload`` is valid, whatever ``payload`` says: to show
    the verifier refuses on content, not only on signature."""
    signature = key.sign(SIGNATURE_CONTEXT + canonical_json(payload))
    return {
        "payload": payload,
        "signature": base64.b64encode(signature).decode("ascii"),
        "public_key": key.public_pem(),
        "algorithm": "Ed25519",
    }
