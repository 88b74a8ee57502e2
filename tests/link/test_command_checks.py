"""The node's command layer in process, on a real journal: every refusal with its reason and
nothing run, the replay cache across a restart, acts-once, cordon, key rotation; arbitrary bytes
(hypothesis) only ever refused.

The commands run against ``RecordingTarget``: the admin handlers' interface answering from
memory, so a test can count exactly what ran. The same path with the real handlers, fences
and scrubs is tests/link/test_commands.py (controller, agents and swtpm as processes)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import CommandRefusedError, ExitCode, NotFoundError
from agent.link.commands import CommandKeyring, CommandService
from agent.link.envelope import (
    COMMAND_CONTEXT,
    CommandKey,
    check_command,
    new_envelope,
    public_pem,
    sign_command,
)
from agent.proto.accelguard.v1 import admin_pb2 as admin_pb
from agent.proto.accelguard.v1 import link_pb2 as pb
from agent.runtime.executor import BlockingExecutor
from agent.store import Store, put_meta
from agent.store.commands import JOURNAL_LOST_AT, CommandLog
from agent.store.outbox import Outbox, OutboxLimits

NODE = "node-b"
LIMITS = OutboxLimits(max_reports=1000, max_bytes=16 << 20, grant_reserve=10, retention_s=3600)


class RecordingTarget:
    """The admin handlers' interface, answering from memory and recording every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def grant(self, request: admin_pb.GrantLeaseRequest) -> admin_pb.GrantLeaseResponse:
        self.calls.append(("grant", request))
        lease = admin_pb.Lease(id=f"lease-{len(self.calls)}", tenant=request.tenant)
        return admin_pb.GrantLeaseResponse(lease=lease, partition=admin_pb.Partition(uuid="GPU-1"))

    async def release(self, request: admin_pb.ReleaseLeaseRequest) -> admin_pb.Partition:
        self.calls.append(("release", request))
        if request.lease_id == "missing":
            raise NotFoundError("lease 'missing' does not exist")
        return admin_pb.Partition(uuid="GPU-1", state="free", clean=True)

    async def layout(self, request: admin_pb.LayoutRequest, apply: bool) -> admin_pb.LayoutResponse:
        self.calls.append(("layout" if apply else "plan", request))
        return admin_pb.LayoutResponse()

    async def quarantine(self, request: admin_pb.PartitionActionRequest) -> admin_pb.Partition:
        self.calls.append(("quarantine", request))
        return admin_pb.Partition(uuid=request.partition_uuid, state="quarantined")

    async def clear(self, request: admin_pb.PartitionActionRequest) -> admin_pb.Partition:
        self.calls.append(("clear", request))
        return admin_pb.Partition(uuid=request.partition_uuid, state="free", clean=True)

    async def certificates(
        self, request: admin_pb.ListCertificatesRequest
    ) -> admin_pb.ListCertificatesResponse:
        assert request.partition_uuid == "GPU-1"
        return admin_pb.ListCertificatesResponse(
            certificates=['{"payload": {"previous_lease_id": "lease-9"}, "signature": "x"}']
        )


class Node:
    """A node's command layer on a journal in ``root``; ``restart()`` reopens everything."""

    def __init__(self, root: Path, key: CommandKey) -> None:
        self.root = root
        root.mkdir(exist_ok=True)
        (root / "command-key.pem").write_text(public_pem(key.private.public_key()))
        self.target = RecordingTarget()
        self.renewals = 0
        self._open()

    def _open(self) -> None:
        self.store = Store(self.root / "agent.db")
        self.outbox = Outbox(self.store, LIMITS)
        self.log = CommandLog(self.store, self.outbox)
        self.executor = BlockingExecutor()
        self.service = CommandService(
            NODE, self.log, self.executor, self.target,
            CommandKeyring(self.root / "command-key.pem"), None,
            wake=lambda: None, renew_certificate=self._renew,
        )  # fmt: skip

    def _renew(self) -> None:
        self.renewals += 1

    def restart(self) -> None:
        self.close()
        self._open()

    def close(self) -> None:
        self.executor.shutdown()
        self.store.close()

    def handle(self, data: bytes) -> None:
        asyncio.run(self.service.handle(data))

    def results(self) -> list[pb.CommandResult]:
        found = []
        for entry in self.outbox.pending(0, 10_000):
            report = pb.Report.FromString(entry.body)
            if report.WhichOneof("body") == "command_result":
                found.append(report.command_result)
        return found

    def last(self) -> pb.CommandResult:
        return self.results()[-1]


@pytest.fixture
def key() -> CommandKey:
    return CommandKey(Ed25519PrivateKey.generate())


@pytest.fixture
def node(tmp_path: Path, key: CommandKey) -> Any:
    running = Node(tmp_path / "node", key)
    yield running
    running.close()


def command(key: CommandKey, kind: str = "grant_lease", body: Any = None, **envelope: Any) -> bytes:
    message = new_envelope(envelope.pop("node_id", NODE), envelope.pop("ttl", 60.0))
    for name, value in envelope.items():
        setattr(message, name, value)
    if body is None:
        body = pb.GrantLeaseCommand(tenant="t", profile="gpu", cgroup="/sys/fs/cgroup/t")
    getattr(message, kind).CopyFrom(body)
    return sign_command(key, message).SerializeToString()


def test_a_valid_command_runs_once_through_the_handlers(node: Node, key: CommandKey) -> None:
    data = command(key)
    node.handle(data)
    result = node.last()
    assert result.ok and result.grant.lease.id == "lease-1"
    assert [name for name, _ in node.target.calls] == ["grant"]
    assert node.target.calls[0][1].profile == "gpu"
    # Re-delivered, before and after a restart: the stored result, nothing runs again.
    node.handle(data)
    node.restart()
    node.handle(data)
    replays = node.results()[1:]
    assert [r.refusal for r in replays] == ["replayed", "replayed"]
    assert all(r.duplicate and r.grant.lease.id == "lease-1" and r.ok for r in replays)
    assert [name for name, _ in node.target.calls] == ["grant"]
    assert [r.reason for r in node.log.refusals()] == ["replayed", "replayed"]


def _refusal(node: Node, data: bytes) -> pb.CommandResult:
    before = len(node.results())
    node.handle(data)
    results = node.results()
    assert len(results) == before + 1
    result = results[-1]
    assert not result.ok and result.exit_code == ExitCode.REFUSED
    assert node.target.calls == [], "a refused command ran"
    return result


def test_every_refusal_names_its_reason_and_runs_nothing(node: Node, key: CommandKey) -> None:
    other = CommandKey(Ed25519PrivateKey.generate())
    now = time.time()
    signed = pb.SignedCommand.FromString(command(key))
    altered = pb.CommandEnvelope.FromString(signed.envelope)
    altered.grant_lease.cgroup = "/sys/fs/cgroup/someone-else"
    tampered = pb.SignedCommand(envelope=altered.SerializeToString(), signature=signed.signature)
    # Signed with the right key id but by another key: the signature check must catch it.
    forged = new_envelope(NODE, 60)
    forged.grant_lease.CopyFrom(pb.GrantLeaseCommand(tenant="t", profile="gpu", cgroup="/c"))
    forged.key_id = key.key_id
    forged_bytes = forged.SerializeToString()
    forged_signed = pb.SignedCommand(
        envelope=forged_bytes, signature=other.private.sign(COMMAND_CONTEXT + forged_bytes)
    )
    # A body this node does not know: an envelope field number outside the closed set.
    unknown = new_envelope(NODE, 60)
    unknown.key_id = key.key_id
    unknown_bytes = unknown.SerializeToString() + b"\xa2\x06\x03abc"  # field 100, 3 bytes
    unknown_signed = pb.SignedCommand(
        envelope=unknown_bytes, signature=key.private.sign(COMMAND_CONTEXT + unknown_bytes)
    )
    cases = {
        "signature": tampered.SerializeToString(),
        "unknown_key": command(other),
        "wrong_node": command(key, node_id="node-a"),
        "expired": command(key, issued_at=now - 120, not_after=now - 60),
        "future": command(key, issued_at=now + 300, not_after=now + 400),
        "unknown_body": unknown_signed.SerializeToString(),
        "oversized": b"\x00" * (64 << 10 + 1),
        "malformed": b"\xff\xfe garbage",
    }
    for reason, data in cases.items():
        result = _refusal(node, data)
        assert result.refusal == reason, (reason, result.error)
        assert f"({reason})" in result.error
    assert _refusal(node, forged_signed.SerializeToString()).refusal == "signature"
    # A lifetime over 10 minutes is malformed even when signed.
    too_long = command(key, issued_at=now, not_after=now + 601)
    assert _refusal(node, too_long).refusal == "malformed"
    journaled = [r.reason for r in node.log.refusals(100)]
    assert sorted(journaled) == sorted([*cases, "signature", "malformed"])
    assert node.log.cached() == 0, "a refused command entered the replay cache"


def test_body_fields_are_validated_after_the_signature(node: Node, key: CommandKey) -> None:
    both = pb.GrantLeaseCommand(tenant="t", profile="gpu", partition_uuid="GPU-1", cgroup="/c")
    result = _refusal(node, command(key, body=both))
    assert result.refusal == "malformed" and "exactly one of" in result.error
    nan_ttl = pb.GrantLeaseCommand(tenant="t", profile="gpu", cgroup="/c", ttl_s=float("nan"))
    assert _refusal(node, command(key, body=nan_ttl)).refusal == "malformed"
    short_nonce = pb.AttestCommand(nonce=b"x")
    assert _refusal(node, command(key, "attest", short_nonce)).refusal == "malformed"


def test_cordoned_nodes_refuse_remote_grants_only(node: Node, key: CommandKey) -> None:
    node.handle(command(key, "cordon", pb.CordonCommand(reason="attestation failed")))
    assert node.last().ok
    node.handle(command(key))
    refused = node.last()
    assert refused.refusal == "cordoned" and not refused.ok
    assert "attestation failed" in refused.error
    node.handle(command(key, "release_lease", pb.ReleaseLeaseCommand(lease_id="lease-9")))
    released = node.last()
    assert released.ok and released.partition.clean
    assert '"previous_lease_id": "lease-9"' in released.scrub_certificate_json
    node.restart()  # the cordon is in the journal
    node.handle(command(key))
    assert node.last().refusal == "cordoned"
    node.handle(command(key, "uncordon", pb.CordonCommand()))
    node.handle(command(key))
    assert node.last().ok
    assert [name for name, _ in node.target.calls] == ["release", "grant"]


def test_errors_of_the_handlers_are_results_with_their_exit_code(
    node: Node, key: CommandKey
) -> None:
    node.handle(command(key, "release_lease", pb.ReleaseLeaseCommand(lease_id="missing")))
    result = node.last()
    assert not result.ok and not result.refusal
    assert result.exit_code == ExitCode.NOT_FOUND and "does not exist" in result.error


def test_rotate_certificate_and_command_key(node: Node, key: CommandKey) -> None:
    node.handle(command(key, "rotate_certificate", pb.RotateCertificateCommand()))
    assert node.last().ok and node.renewals == 1
    new = CommandKey(Ed25519PrivateKey.generate())
    pem = public_pem(new.private.public_key())
    wrong_id = pb.CommandKeyAnnouncement(public_key_pem=pem, key_id="0" * 32)
    node.handle(command(key, "announce_command_key", wrong_id))
    assert node.last().refusal == "malformed"
    announcement = pb.CommandKeyAnnouncement(public_key_pem=pem, key_id=new.key_id)
    # Announced by a key the node does not trust: refused.
    node.handle(command(new, "announce_command_key", announcement))
    assert node.last().refusal == "unknown_key"
    node.handle(command(key, "announce_command_key", announcement))
    assert node.last().ok
    node.handle(command(key))
    assert node.last().refusal == "unknown_key", "the old key still works after rotation"
    node.handle(command(new))
    assert node.last().ok


def test_the_replay_cache_forgets_only_expired_commands(node: Node, key: CommandKey) -> None:
    now = time.time()
    node.handle(command(key, issued_at=now - 5, not_after=now + 1))
    node.handle(command(key))
    assert node.log.cached() == 2
    assert node.log.purge(now + 2) == 1
    assert node.log.cached() == 1


def test_a_command_interrupted_by_a_crash_is_never_run_again(node: Node, key: CommandKey) -> None:
    data = command(key)
    checked = check_command(data, {key.key_id: key.private.public_key()}, NODE, now=time.time())
    # The agent died after claiming the id, before a result: the journal says 'running'.
    envelope = checked.envelope
    node.log.claim(bytes(envelope.command_id), checked.kind, envelope.not_after, envelope.issued_at)
    node.restart()
    node.handle(data)
    result = node.last()
    assert result.refusal == "replayed" and result.duplicate and not result.ok
    assert "outcome is unknown" in result.error
    assert node.target.calls == []


def test_after_a_restore_unknown_commands_issued_before_it_are_refused(
    node: Node, key: CommandKey
) -> None:
    """``state import`` brings back the backup's replay cache: a command that ran on the
    journal it replaced is not in it. Ids it lacks, issued before the import, are refused; ids
    it holds are answered from it; commands issued after the import run."""
    known = command(key)
    node.handle(known)
    now = time.time()
    with node.store.transaction() as db:
        put_meta(db, "restored_at", repr(now))  # as agent/store/restore.py records it
    node.restart()
    unknown = command(key, issued_at=now - 30, not_after=now + 60)
    before = len(node.target.calls)
    node.handle(unknown)
    refused = node.last()
    assert refused.refusal == "replayed" and not refused.ok, refused
    assert "restored from a backup" in refused.error
    node.handle(known)
    assert node.last().duplicate and node.last().ok, "a known id is answered from the cache"
    assert len(node.target.calls) == before
    node.handle(command(key, issued_at=now + 1, not_after=now + 60))
    assert node.last().ok and not node.last().duplicate
    assert len(node.target.calls) == before + 1


def test_after_a_lost_journal_commands_issued_before_it_are_refused(
    node: Node, key: CommandKey
) -> None:
    """A lost journal (deleted, emptied) loses the replay cache with it: a command that ran
    before, delivered again within its lifetime, must not run a second time."""
    ran = command(key)
    node.handle(ran)
    node.close()
    for suffix in ("", "-wal", "-shm"):
        (node.root / f"agent.db{suffix}").unlink(missing_ok=True)
    store = Store(node.root / "agent.db")
    with store.transaction() as db:
        put_meta(db, JOURNAL_LOST_AT, repr(time.time()))  # as the daemon records a loss
    store.close()
    node._open()
    node.handle(ran)
    refused = node.last()
    assert refused.refusal == "replayed" and not refused.ok, refused
    assert [name for name, _ in node.target.calls] == ["grant"], "it ran twice"


class GatedTarget(RecordingTarget):
    """A grant that runs until ``gate`` is set (a long fence and scrub)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def grant(self, request: admin_pb.GrantLeaseRequest) -> admin_pb.GrantLeaseResponse:
        self.entered.set()
        await self.gate.wait()
        return await super().grant(request)


def test_a_copy_delivered_while_the_first_run_is_under_way_is_left_to_that_run(
    node: Node, key: CommandKey
) -> None:
    """The controller re-sends what has no result yet (a broker restart, a new session). A copy
    that arrives while the one run is still going gets no answer of its own: an 'interrupted'
    answer would reach the controller first and be kept as the command's result."""
    data = command(key)
    target = GatedTarget()
    node.service._target = target

    async def deliver_twice() -> None:
        first = asyncio.create_task(node.service.handle(data))
        await target.entered.wait()
        await node.service.handle(data)
        assert node.results() == [], "the copy was answered while the first run was going"
        target.gate.set()
        await first

    asyncio.run(deliver_twice())
    results = node.results()
    assert len(results) == 1 and results[0].ok and not results[0].duplicate, results
    assert [name for name, _ in target.calls] == ["grant"]
    # Once the run has finished, a copy gets its stored result as before.
    node.handle(data)
    replay = node.last()
    assert replay.duplicate and replay.ok and replay.grant.lease.id == "lease-1"
    assert [name for name, _ in target.calls] == ["grant"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes_are_refused(data: bytes) -> None:
    key = CommandKey(Ed25519PrivateKey.generate())
    with pytest.raises(CommandRefusedError) as refused:
        check_command(data, {key.key_id: key.private.public_key()}, NODE, now=time.time())
    assert refused.value.reason in {"oversized", "malformed", "unknown_key"}


_GRANTS = st.builds(
    lambda tenant, profile, uuid, cgroup, ttl: pb.CommandEnvelope(
        grant_lease=pb.GrantLeaseCommand(
            tenant=tenant, profile=profile, partition_uuid=uuid, cgroup=cgroup, ttl_s=ttl
        )
    ).SerializeToString(),
    st.text(max_size=300),
    st.text(max_size=80),
    st.text(max_size=80),
    st.text(max_size=5000),
    st.floats(allow_nan=True, allow_infinity=True),
)
_ATTESTS = st.builds(
    lambda nonce, banks: pb.CommandEnvelope(
        attest=pb.AttestCommand(
            nonce=nonce, selection=[pb.PcrSelection(bank=b, pcrs=p) for b, p in banks]
        )
    ).SerializeToString(),
    st.binary(max_size=100),
    st.lists(st.tuples(st.text(max_size=20), st.lists(st.integers(0, 2**32 - 1), max_size=30))),
)
_BODY_KINDS = [f.name for f in pb.CommandEnvelope.DESCRIPTOR.oneofs_by_name["body"].fields]


@settings(max_examples=300, deadline=None)
@given(
    body=st.one_of(st.binary(max_size=2048), _GRANTS, _ATTESTS),
    command_id=st.binary(min_size=16, max_size=16),
)
def test_arbitrary_signed_envelopes_are_checked_or_refused(body: bytes, command_id: bytes) -> None:
    """Even bytes the controller's key signed (a controller bug) never crash the checks."""
    key = CommandKey(Ed25519PrivateKey.generate())
    now = time.time()
    header = pb.CommandEnvelope(
        command_id=command_id, node_id=NODE, issued_at=now, not_after=now + 60, key_id=key.key_id
    ).SerializeToString()
    envelope = header + body
    signed = pb.SignedCommand(
        envelope=envelope, signature=key.private.sign(COMMAND_CONTEXT + envelope)
    ).SerializeToString()
    try:
        checked = check_command(signed, {key.key_id: key.private.public_key()}, NODE, now=now)
    except CommandRefusedError as refusal:
        assert refusal.reason in {
            "malformed", "unknown_body", "wrong_node", "expired", "future", "unknown_key",
            "signature",
        }  # fmt: skip
    else:
        assert checked.kind in _BODY_KINDS
        if checked.kind == "grant_lease":
            grant = checked.envelope.grant_lease
            assert bool(grant.profile) != bool(grant.partition_uuid)
            assert grant.cgroup and len(grant.cgroup) <= 4096


def test_command_ids_are_random() -> None:
    ids = {bytes(new_envelope(NODE, 60).command_id) for _ in range(1000)}
    assert len(ids) == 1000
