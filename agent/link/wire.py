"""Decoding and validating link and enrollment messages from the network.

Both ends use these: the controller on what nodes send, the node on what the controller answers.
Every byte string either becomes a message whose fields are within the bounds below, or raises
:class:`~agent.errors.LinkProtocolError` naming the field; nothing else escapes (hypothesis
checks that in tests/link/test_wire_fuzz.py). Validation checks shape only; what a report
means is for the controller's store to judge.
"""

from __future__ import annotations

import math
import re
from typing import Final, TypeVar

from google.protobuf.message import DecodeError, Message

from agent.errors import LinkProtocolError
from agent.proto.accelguard.v1 import link_pb2 as pb

# The largest message either end accepts (gRPC's limit is set to the same): attestation evidence
# with an incremental IMA list is the largest report.
MAX_MESSAGE_BYTES: Final = 16 << 20
MAX_TEXT: Final = 256
MAX_REASON: Final = 4096
MAX_GPUS: Final = 64
MAX_PARTITIONS: Final = 64 * 8
MAX_CSR_BYTES: Final = 16 << 10
MAX_CERTIFICATE_BYTES: Final = 16 << 10
MAX_TPM_PUBLIC_BYTES: Final = 1024
MAX_EK_CERTIFICATE_BYTES: Final = 16 << 10
MAX_SCRUB_PAYLOAD_BYTES: Final = 512 << 10
ED25519_SIGNATURE_BYTES: Final = 64
CHALLENGE_ID_BYTES: Final = 16
MAX_SECRET_BYTES: Final = 64
MAX_TOKEN: Final = 128
MAX_PEM: Final = 1024
# A Unix time a sane clock can show (2001 .. 2286): rejects NaN, infinities and nonsense.
_MIN_TIME: Final = 1e9
_MAX_TIME: Final = 1e10
_STATES: Final = frozenset({"free", "leased", "releasing", "scrubbing", "quarantined"})
_LEASE_STATES: Final = frozenset({"granting", "active", "releasing", "released", "lost"})
_KINDS: Final = frozenset({"gpu", "mig", "npu", "vnpu", "accel"})
# "" from agents that predate NPU support (their devices are NVIDIA GPUs).
_VENDORS: Final = frozenset({"", "nvidia", "huawei", "accel"})
_PRINTABLE = re.compile(r"[\x20-\x7e]*")

M = TypeVar("M", bound=Message)


def parse(data: bytes, message: type[M], what: str) -> M:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise LinkProtocolError(f"{what}: expected bytes, not {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise LinkProtocolError(f"{what}: {len(data)} bytes, over the {MAX_MESSAGE_BYTES} limit")
    parsed = message()
    try:
        parsed.ParseFromString(bytes(data))
    except (DecodeError, RuntimeError, ValueError) as error:
        # RuntimeError: upb's recursion limit on deeply nested garbage.
        raise LinkProtocolError(
            f"{what}: not a valid {message.__name__} message: {error}"
        ) from None
    return parsed


def _text(value: str, where: str, limit: int = MAX_TEXT, *, required: bool = False) -> None:
    if len(value) > limit:
        raise LinkProtocolError(f"{where}: longer than {limit} characters")
    if required and not value:
        raise LinkProtocolError(f"{where}: required")
    if not _PRINTABLE.fullmatch(value) and limit <= MAX_TEXT:
        # Identifiers and states are printable ASCII; free text (reasons) may be anything.
        raise LinkProtocolError(f"{where}: must be printable ASCII")


def _bytes(value: bytes, where: str, limit: int, *, required: bool = False) -> None:
    if len(value) > limit:
        raise LinkProtocolError(f"{where}: {len(value)} bytes, over the {limit}-byte limit")
    if required and not value:
        raise LinkProtocolError(f"{where}: required")


def _time(value: float, where: str, *, optional: bool = False) -> None:
    if optional and value == 0:
        return
    if not math.isfinite(value) or not _MIN_TIME <= value <= _MAX_TIME:
        raise LinkProtocolError(f"{where}: {value!r} is not a Unix time")


def _finite(value: float, where: str) -> None:
    if not math.isfinite(value) or value < 0:
        raise LinkProtocolError(f"{where}: must be a finite number >= 0")


def decode_uplink(data: bytes) -> pb.Uplink:
    message = parse(data, pb.Uplink, "uplink")
    validate_uplink(message)
    return message


MAX_SESSION_BYTES: Final = 32


def validate_uplink(message: pb.Uplink) -> None:
    _bytes(message.session, "uplink.session", MAX_SESSION_BYTES)
    which = message.WhichOneof("message")
    if which == "hello":
        hello = message.hello
        _text(hello.agent_version, "hello.agent_version", 64, required=True)
        _text(hello.boot_id, "hello.boot_id", 64)
        if hello.epoch == 0:
            raise LinkProtocolError("hello.epoch: must not be 0")
    elif which == "report":
        validate_report(message.report)
    elif which == "renew":
        _bytes(message.renew.csr, "renew.csr", MAX_CSR_BYTES, required=True)
    else:
        raise LinkProtocolError("uplink: no message set (hello, report or renew)")


def validate_report(report: pb.Report) -> None:
    if report.seq == 0:
        raise LinkProtocolError("report.seq: must be 1 or more")
    if report.after_seq >= report.seq:
        raise LinkProtocolError(
            f"report.after_seq: {report.after_seq} is not below the report's seq {report.seq}"
        )
    _time(report.created_at, "report.created_at")
    body = report.WhichOneof("body")
    if body is None:
        raise LinkProtocolError(f"report {report.seq}: no body")
    where = f"report {report.seq} ({body})"
    if body == "inventory":
        _inventory(report.inventory, where)
    elif body == "lease":
        lease = report.lease
        _text(lease.lease_id, f"{where}.lease_id", required=True)
        _text(lease.partition_uuid, f"{where}.partition_uuid", required=True)
        _text(lease.tenant, f"{where}.tenant")
        if lease.state not in _LEASE_STATES:
            raise LinkProtocolError(f"{where}.state: {lease.state[:32]!r} is not a lease state")
        _text(lease.reason, f"{where}.reason", MAX_REASON)
        _text(lease.outcome, f"{where}.outcome", MAX_REASON)
        _time(lease.expires_at, f"{where}.expires_at", optional=True)
    elif body == "partition":
        event = report.partition
        _text(event.partition_uuid, f"{where}.partition_uuid", required=True)
        if event.state not in _STATES:
            raise LinkProtocolError(f"{where}.state: {event.state[:32]!r} is not a state")
        _text(event.reason, f"{where}.reason", MAX_REASON)
        _text(event.lease_id, f"{where}.lease_id")
    elif body == "scrub_certificate":
        cert = report.scrub_certificate
        _bytes(cert.canonical_payload, f"{where}.canonical_payload", MAX_SCRUB_PAYLOAD_BYTES,
               required=True)  # fmt: skip
        if len(cert.signature) != ED25519_SIGNATURE_BYTES:
            raise LinkProtocolError(f"{where}.signature: must be 64 bytes (Ed25519)")
        if cert.algorithm != "Ed25519":
            raise LinkProtocolError(f"{where}.algorithm: only Ed25519 is accepted")
    elif body == "health":
        health = report.health
        _finite(health.uptime_s, f"{where}.uptime_s")
        if len(health.gpus) > MAX_GPUS:
            raise LinkProtocolError(f"{where}.gpus: more than {MAX_GPUS}")
        for gpu in health.gpus:
            _text(gpu.uuid, f"{where}.gpus.uuid", required=True)
            if not math.isfinite(gpu.temperature_c) or not math.isfinite(gpu.power_w):
                raise LinkProtocolError(f"{where}.gpus: readings must be finite")
    elif body == "attestation":
        _evidence(report.attestation, f"{where}.attestation")
    elif body == "command_result":
        result = report.command_result
        # A refusal of bytes that never decoded has no command id to name.
        _bytes(result.command_id, f"{where}.command_id", 64, required=not result.refusal)
        _text(result.error, f"{where}.error", MAX_REASON)
        _text(result.detail, f"{where}.detail", MAX_REASON)
        _text(result.refusal, f"{where}.refusal", 32)
        _text(result.scrub_certificate_json, f"{where}.scrub_certificate_json",
              MAX_SCRUB_PAYLOAD_BYTES)  # fmt: skip
        if result.WhichOneof("result") == "attestation":
            _evidence(result.attestation, f"{where}.attestation")
    elif body == "health_event":
        fault = report.health_event
        _text(fault.gpu_uuid, f"{where}.gpu_uuid", required=True)
        _text(fault.kind, f"{where}.kind", 32, required=True)
        _text(fault.action, f"{where}.action", 32, required=True)
        _text(fault.detail, f"{where}.detail", MAX_REASON)
        _time(fault.at, f"{where}.at")
        if fault.gpu_index >= MAX_GPUS or len(fault.partitions) > MAX_PARTITIONS:
            raise LinkProtocolError(f"{where}: GPU index or partition list out of bounds")
        for uuid in fault.partitions:
            _text(uuid, f"{where}.partitions")
    elif body == "audit_checkpoint":
        checkpoint = report.audit_checkpoint
        _bytes(checkpoint.chain_hash, f"{where}.chain_hash", 64, required=True)
        _bytes(checkpoint.prev_chain_hash, f"{where}.prev_chain_hash", 64, required=True)
        _bytes(checkpoint.signature, f"{where}.signature", 128, required=True)
        _text(checkpoint.key_id, f"{where}.key_id", 64, required=True)
        _time(checkpoint.at, f"{where}.at")
        if checkpoint.prev_record_index >= checkpoint.record_index:
            raise LinkProtocolError(
                f"{where}: record_index {checkpoint.record_index} is not after "
                f"prev_record_index {checkpoint.prev_record_index}"
            )


def _evidence(evidence: pb.AttestationEvidence, where: str) -> None:
    _bytes(evidence.ak_public, f"{where}.ak_public", MAX_TPM_PUBLIC_BYTES, required=True)
    _bytes(evidence.quote, f"{where}.quote", MAX_TPM_PUBLIC_BYTES, required=True)
    _bytes(evidence.signature, f"{where}.signature", MAX_TPM_PUBLIC_BYTES, required=True)
    _bytes(evidence.nonce, f"{where}.nonce", 64)
    _text(evidence.boot_id, f"{where}.boot_id", 64)
    for bank in evidence.pcrs:
        _text(bank.bank, f"{where}.pcrs.bank", 16, required=True)
        if any(index > 23 or len(v) > 64 for index, v in bank.values.items()):
            raise LinkProtocolError(f"{where}.pcrs.{bank.bank}: PCR index or value invalid")


# --- remote commands: the body of an authenticated envelope ---------------------------------

MAX_CGROUP: Final = 4096
MAX_LAYOUT_TARGETS: Final = 64
MIN_NONCE_BYTES: Final = 16
MAX_NONCE_BYTES: Final = 64


def validate_command_body(envelope: pb.CommandEnvelope) -> str:
    """Check the shape of an authenticated command's body; its kind (the oneof member).

    Raises :class:`LinkProtocolError` naming the field; an envelope without a known body (a
    newer controller's, or none) is refused by the caller before this runs.
    """
    kind = envelope.WhichOneof("body")
    where = f"command.{kind}"
    if kind == "grant_lease":
        grant = envelope.grant_lease
        _text(grant.tenant, f"{where}.tenant", required=True)
        _text(grant.partition_uuid, f"{where}.partition_uuid")
        _text(grant.profile, f"{where}.profile", 64)
        if bool(grant.partition_uuid) == bool(grant.profile):
            raise LinkProtocolError(f"{where}: give exactly one of partition_uuid and profile")
        _text(grant.cgroup, f"{where}.cgroup", MAX_CGROUP, required=True)
        if not _PRINTABLE.fullmatch(grant.cgroup):
            raise LinkProtocolError(f"{where}.cgroup: must be printable ASCII")
        _finite(grant.ttl_s, f"{where}.ttl_s")
        _text(grant.scrub_policy, f"{where}.scrub_policy", 32)
    elif kind == "release_lease":
        _text(envelope.release_lease.lease_id, f"{where}.lease_id", required=True)
    elif kind == "apply_layout":
        targets = envelope.apply_layout.targets
        if not targets or len(targets) > MAX_LAYOUT_TARGETS:
            raise LinkProtocolError(f"{where}.targets: 1 to {MAX_LAYOUT_TARGETS} targets")
        for target in targets:
            if len(target.gpu_indices) > MAX_GPUS or len(target.device_filter) > MAX_GPUS:
                raise LinkProtocolError(f"{where}.targets: more than {MAX_GPUS} GPUs or filters")
            for text in target.device_filter:
                _text(text, f"{where}.targets.device_filter", 32)
            if len(target.counts) > 64:
                raise LinkProtocolError(f"{where}.targets.counts: more than 64 profiles")
            for name in target.counts:
                _text(name, f"{where}.targets.counts", 64, required=True)
    elif kind in ("quarantine_partition", "clear_partition"):
        action = getattr(envelope, kind)
        _text(action.partition_uuid, f"{where}.partition_uuid", required=True)
        _text(action.reason, f"{where}.reason", MAX_REASON)
    elif kind == "attest":
        attest = envelope.attest
        if not MIN_NONCE_BYTES <= len(attest.nonce) <= MAX_NONCE_BYTES:
            raise LinkProtocolError(
                f"{where}.nonce: must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes"
            )
        if len(attest.selection) > 8:
            raise LinkProtocolError(f"{where}.selection: more than 8 banks")
        for bank in attest.selection:
            _text(bank.bank, f"{where}.selection.bank", 16, required=True)
            if not bank.pcrs or len(bank.pcrs) > 24 or any(i > 23 for i in bank.pcrs):
                raise LinkProtocolError(f"{where}.selection.{bank.bank}: PCRs 0..23, 1 to 24")
        _text(attest.boot_id, f"{where}.boot_id", 64)
    elif kind in ("cordon", "uncordon"):
        _text(getattr(envelope, kind).reason, f"{where}.reason", MAX_REASON)
    elif kind == "announce_command_key":
        announcement = envelope.announce_command_key
        if not announcement.public_key_pem or len(announcement.public_key_pem) > MAX_PEM:
            raise LinkProtocolError(f"{where}.public_key_pem: required, at most {MAX_PEM} chars")
        _text(announcement.key_id, f"{where}.key_id", 64, required=True)
    elif kind != "rotate_certificate":
        raise LinkProtocolError("command: no body, or one this node does not know")
    return str(kind)


def _inventory(snapshot: pb.InventorySnapshot, where: str) -> None:
    _text(snapshot.driver_version, f"{where}.driver_version", 64)
    if len(snapshot.gpus) > MAX_GPUS:
        raise LinkProtocolError(f"{where}.gpus: more than {MAX_GPUS}")
    if len(snapshot.partitions) > MAX_PARTITIONS:
        raise LinkProtocolError(f"{where}.partitions: more than {MAX_PARTITIONS}")
    for gpu in snapshot.gpus:
        _text(gpu.uuid, f"{where}.gpus.uuid", required=True)
        _text(gpu.name, f"{where}.gpus.name")
        _text(gpu.serial, f"{where}.gpus.serial")
        _text(gpu.health, f"{where}.gpus.health", 32)
        if gpu.vendor not in _VENDORS:
            raise LinkProtocolError(
                f"{where}.gpus.vendor: {gpu.vendor[:16]!r} is not one of {sorted(_VENDORS)}"
            )
    for part in snapshot.partitions:
        _text(part.uuid, f"{where}.partitions.uuid", required=True)
        if part.kind not in _KINDS:
            raise LinkProtocolError(
                f"{where}.partitions.kind: {part.kind[:16]!r} is not one of {sorted(_KINDS)}"
            )
        if part.state not in _STATES:
            raise LinkProtocolError(f"{where}.partitions.state: {part.state[:32]!r} unknown")
        _text(part.profile, f"{where}.partitions.profile")
        _text(part.reason, f"{where}.partitions.reason", MAX_REASON)
        _text(part.lease_id, f"{where}.partitions.lease_id")


def decode_enroll_request(data: bytes) -> pb.EnrollRequest:
    message = parse(data, pb.EnrollRequest, "enrollment request")
    which = message.WhichOneof("step")
    if which == "begin":
        begin = message.begin
        _text(begin.token, "begin.token", MAX_TOKEN, required=True)
        _bytes(begin.csr, "begin.csr", MAX_CSR_BYTES, required=True)
        _bytes(begin.ek_public, "begin.ek_public", MAX_TPM_PUBLIC_BYTES)
        _bytes(begin.ek_certificate, "begin.ek_certificate", MAX_EK_CERTIFICATE_BYTES)
        _bytes(begin.ak_public, "begin.ak_public", MAX_TPM_PUBLIC_BYTES)
        if bool(begin.ek_public) != bool(begin.ak_public):
            raise LinkProtocolError("begin: ek_public and ak_public come together or not at all")
        if begin.ek_certificate and not begin.ek_public:
            raise LinkProtocolError("begin.ek_certificate: given without ek_public")
        if len(begin.scrub_key_pem) > MAX_PEM or not begin.scrub_key_pem:
            raise LinkProtocolError(f"begin.scrub_key_pem: required, at most {MAX_PEM} chars")
        _text(begin.agent_version, "begin.agent_version", 64)
    elif which == "activate":
        activate = message.activate
        if len(activate.challenge_id) != CHALLENGE_ID_BYTES:
            raise LinkProtocolError(f"activate.challenge_id: must be {CHALLENGE_ID_BYTES} bytes")
        _bytes(activate.secret, "activate.secret", MAX_SECRET_BYTES, required=True)
    else:
        raise LinkProtocolError("enrollment request: no step set (begin or activate)")
    return message


def decode_downlink(data: bytes) -> pb.Downlink:
    message = parse(data, pb.Downlink, "downlink")
    _bytes(message.session, "downlink.session", MAX_SESSION_BYTES)
    which = message.WhichOneof("message")
    if which == "closed":
        _text(message.closed.code, "closed.code", 64, required=True)
        _text(message.closed.detail, "closed.detail", MAX_REASON)
    elif which == "hello":
        _time(message.hello.server_time, "hello.server_time", optional=True)
    elif which == "certificate":
        _bytes(message.certificate.certificate, "certificate", MAX_CERTIFICATE_BYTES, required=True)
    elif which is None:
        # Unknown oneof members (a newer controller's commands) arrive as unknown fields: ignore
        # them rather than drop the link, so controllers can be upgraded first.
        pass
    return message
