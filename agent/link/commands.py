"""The node's command layer (docs/commands.md): authenticate, deduplicate, record; then run the
command through the same handlers as the local admin API, and report the result.

Order for every command, before anything changes: size and decode, signature by the pinned
command key, this node, not issued in the future, not expired (agent/link/envelope.py), then the
replay cache in the journal (agent/store/commands.py). A refusal is journaled and reported
uplink with its reason; a re-delivered command that already ran is answered with the stored
result of its one run (``duplicate``) and acts no more. One re-delivered while its first run is
still under way is dropped: that run's result answers it. A command found 'running' in the cache
and not under way was interrupted by a crash: its outcome is unknown and it is never run again.
An id the cache does not hold that was issued before the cache began (a journal made again after
a loss, or restored from a backup by ``state import``) may have run on the journal that was lost
or replaced, so it is refused as replayed too.

There is no remote shell, file or process verb here, and the dispatch below is the closed set:
adding a verb is a design change (docs/commands.md, docs/threat-model.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.errors import AccelguardError, CommandRefusedError, ExitCode, IdentityError
from agent.identity.files import write_private
from agent.link.envelope import (
    DEFAULT_CLOCK_SKEW_S,
    CheckedCommand,
    RefusalReason,
    check_command,
    claimed_id,
    command_key_id,
    load_command_public_key,
)
from agent.proto.accelguard.v1 import admin_pb2 as admin_pb
from agent.proto.accelguard.v1 import link_pb2 as pb
from agent.runtime.executor import BlockingExecutor
from agent.store.audit import Actor, acting_as
from agent.store.commands import Claim, ClaimState, CommandLog

log = structlog.get_logger(__name__)

# Commands running at once; more wait their turn (a release runs a scrub).
MAX_RUNNING: Final = 16
PURGE_EVERY_S: Final = 60.0


class CommandTarget(Protocol):
    """What commands run: the admin API's handlers (agent/admin/handlers.py), the same code as
    the local CLI's calls."""

    async def grant(self, request: admin_pb.GrantLeaseRequest) -> admin_pb.GrantLeaseResponse: ...
    async def release(self, request: admin_pb.ReleaseLeaseRequest) -> admin_pb.Partition: ...
    async def layout(
        self, request: admin_pb.LayoutRequest, apply: bool
    ) -> admin_pb.LayoutResponse: ...
    async def quarantine(self, request: admin_pb.PartitionActionRequest) -> admin_pb.Partition: ...
    async def clear(self, request: admin_pb.PartitionActionRequest) -> admin_pb.Partition: ...
    async def certificates(
        self, request: admin_pb.ListCertificatesRequest
    ) -> admin_pb.ListCertificatesResponse: ...


class Attester(Protocol):
    """Quotes with the enrolled AK and ships the evidence (agent/link/attestation.py)."""

    async def attest(self, command: pb.AttestCommand) -> pb.AttestationEvidence: ...


class CommandKeyring:
    """The controller's command key this node pinned at enrollment (``command-key.pem``),
    replaced only by an announcement the current key signed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cached: tuple[float, dict[str, Ed25519PublicKey]] | None = None

    def keys(self) -> dict[str, Ed25519PublicKey]:
        try:
            mtime = self.path.stat().st_mtime
            if self._cached is not None and self._cached[0] == mtime:
                return self._cached[1]
            key = load_command_public_key(self.path.read_bytes(), str(self.path))
        except (OSError, AccelguardError) as error:
            raise IdentityError(
                f"no usable command key at {self.path} (run `accelguard enroll`): {error}"
            ) from None
        keys = {command_key_id(key): key}
        self._cached = (mtime, keys)
        return keys

    def install(self, announcement: pb.CommandKeyAnnouncement) -> str:
        key = load_command_public_key(announcement.public_key_pem, "announced command key")
        key_id = command_key_id(key)
        if key_id != announcement.key_id:
            raise CommandRefusedError(
                RefusalReason.MALFORMED,
                f"announced key id {announcement.key_id[:64]!r} is not the key's ({key_id})",
            )
        write_private(self.path, announcement.public_key_pem.encode("ascii"))
        self._cached = None
        return key_id


class CommandService:
    def __init__(
        self,
        node_id: str,
        log_: CommandLog,
        executor: BlockingExecutor,
        target: CommandTarget,
        keyring: CommandKeyring,
        attester: Attester | None,
        *,
        wake: Callable[[], None],
        renew_certificate: Callable[[], None],
        clock_skew_s: float = DEFAULT_CLOCK_SKEW_S,
    ) -> None:
        self._node_id = node_id
        self._log = log_
        self._executor = executor
        self._target = target
        self._keyring = keyring
        self._attester = attester
        self._wake = wake
        self._renew_certificate = renew_certificate
        self._skew = clock_skew_s
        self._running = asyncio.Semaphore(MAX_RUNNING)
        self._tasks: set[asyncio.Task[None]] = set()
        # Ids whose one run is under way in this process: a re-delivery meanwhile (the
        # controller re-sends what has no result yet, e.g. after a broker restart) is dropped,
        # as its result is on the way; 'interrupted' is only for a run a crash cut short.
        self._in_progress: set[bytes] = set()
        self._next_purge = 0.0

    def submit(self, data: bytes) -> None:
        """Handle a command from the stream in its own task: a disconnect does not interrupt a
        command that runs (its result goes to the outbox whatever happens to the link)."""
        task = asyncio.get_running_loop().create_task(self.handle(data), name="link-command")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def handle(self, data: bytes) -> None:
        try:
            await self._handle(data)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Nothing a command does may stop the link or the daemon; its outcome is unknown
            # and the cache entry stays 'running' (a re-delivery says so).
            log.exception("command_internal_error")

    async def _handle(self, data: bytes) -> None:
        now = time.time()
        try:
            keys = await self._executor.call(self._keyring.keys)
            checked = check_command(data, keys, self._node_id, now=now, clock_skew_s=self._skew)
        except CommandRefusedError as refusal:
            await self._refuse(refusal.command_id or claimed_id(data), refusal)
            return
        except IdentityError as error:
            await self._refuse(
                claimed_id(data),
                CommandRefusedError(RefusalReason.UNKNOWN_KEY, f"command refused: {error}"),
            )
            return
        envelope = checked.envelope
        command_id = bytes(envelope.command_id)
        actor = Actor("controller", command_id=command_id.hex(), key_id=envelope.key_id)
        with acting_as(actor):
            await self._authenticated(checked, command_id, now)

    async def _authenticated(self, checked: CheckedCommand, command_id: bytes, now: float) -> None:
        """A command whose checks passed, run once (every record it leaves names it)."""
        envelope = checked.envelope
        if command_id in self._in_progress:
            log.info("command_redelivered_while_running", command=command_id.hex(),
                     kind=checked.kind)  # fmt: skip
            return
        self._in_progress.add(command_id)
        try:
            if now >= self._next_purge:
                self._next_purge = now + PURGE_EVERY_S
                await self._executor.call(self._log.purge, now)
            claim: Claim = await self._executor.call(
                self._log.claim, command_id, checked.kind, envelope.not_after, envelope.issued_at
            )
            if claim.state is not ClaimState.NEW:
                await self._replayed(command_id, checked.kind, claim)
                return
            async with self._running:
                result = await self._run(checked)
            result.command_id = command_id
            stored = result.SerializeToString()
            report = pb.Report(command_result=result).SerializeToString()
            await self._executor.call(
                self._log.finish, command_id, stored, report, result.refusal, result.error,
                result.ok,
            )  # fmt: skip
        finally:
            self._in_progress.discard(command_id)
        self._wake()
        log.info(
            "command_ran", command=command_id.hex(), kind=checked.kind, ok=result.ok,
            error=result.error or None, refusal=result.refusal or None,
        )  # fmt: skip

    async def _replayed(self, command_id: bytes, kind: str, claim: Claim) -> None:
        """The id is in the replay cache: refuse to act again; answer with the first run's
        result so a controller that re-delivered it (a lost result) gets its answer. Or the
        cache cannot say (issued before it began): refuse, with nothing to answer."""
        if claim.state is ClaimState.BEFORE_CACHE:
            await self._refuse(command_id, CommandRefusedError(
                RefusalReason.REPLAYED,
                f"command refused (replayed): {kind} {command_id.hex()} was issued before this "
                "node's replay cache began (its journal was lost, or restored from a backup, "
                "since), so the cache cannot say whether it ran; issue it again",
                command_id,
            ))  # fmt: skip
            return
        if claim.state is ClaimState.DONE and claim.result is not None:
            result = pb.CommandResult.FromString(claim.result)
            detail = "re-delivered: this is the stored result of its one run"
        else:
            result = pb.CommandResult(
                ok=False,
                error="interrupted: the agent stopped while this command ran; its outcome is "
                "unknown (check the node's leases and partitions) and it is not run again",
                exit_code=ExitCode.FAILED,
            )
            detail = "re-delivered while its first run has no result"
        result.command_id = command_id
        result.duplicate = True
        refusal = CommandRefusedError(
            RefusalReason.REPLAYED,
            f"command refused (replayed): {kind} {command_id.hex()} was already received; {detail}",
            command_id,
        )
        await self._refuse(command_id, refusal, result)

    async def _refuse(
        self,
        command_id: bytes,
        refusal: CommandRefusedError,
        result: pb.CommandResult | None = None,
    ) -> None:
        if result is None:
            result = pb.CommandResult(
                command_id=command_id,
                ok=False,
                error=str(refusal)[:4096],
                refusal=refusal.reason,
                exit_code=ExitCode.REFUSED,
            )
        else:
            result.refusal = refusal.reason
        log.warning("command_refused", command=command_id.hex(), reason=refusal.reason,
                    detail=str(refusal))  # fmt: skip
        report = pb.Report(command_result=result).SerializeToString()
        with contextlib.suppress(AccelguardError):
            # A full journal loses the refusal's report, never anything else (logged above).
            await self._executor.call(
                self._log.refuse, command_id, str(refusal.reason), str(refusal)[:4096], report
            )
        self._wake()

    # -- the closed set ----------------------------------------------------------------------

    async def _run(self, checked: CheckedCommand) -> pb.CommandResult:
        envelope = checked.envelope
        try:
            return await self._dispatch(checked.kind, envelope)
        except CommandRefusedError as refusal:
            # Refused by the node's own state (cordoned): the result is stored like any other,
            # and finish() journals the refusal with it.
            return pb.CommandResult(
                ok=False, error=str(refusal)[:4096], refusal=refusal.reason,
                exit_code=ExitCode.REFUSED,
            )  # fmt: skip
        except AccelguardError as error:
            return pb.CommandResult(ok=False, error=str(error)[:4096], exit_code=error.exit_code)

    async def _dispatch(self, kind: str, envelope: pb.CommandEnvelope) -> pb.CommandResult:
        target = self._target
        if kind == "grant_lease":
            cordoned, reason = await self._executor.call(self._log.cordoned)
            if cordoned:
                raise CommandRefusedError(
                    RefusalReason.CORDONED,
                    f"command refused (cordoned): this node is cordoned ({reason or 'no reason'});"
                    " it takes no remote grants until uncordoned",
                )
            grant = envelope.grant_lease
            request = admin_pb.GrantLeaseRequest(
                tenant=grant.tenant, cgroup=grant.cgroup, ttl_s=grant.ttl_s,
                scrub_policy=grant.scrub_policy,
            )  # fmt: skip
            if grant.partition_uuid:
                request.partition_uuid = grant.partition_uuid
            else:
                request.profile = grant.profile
            return pb.CommandResult(ok=True, grant=await target.grant(request))
        if kind == "release_lease":
            lease_id = envelope.release_lease.lease_id
            partition = await target.release(admin_pb.ReleaseLeaseRequest(lease_id=lease_id))
            return pb.CommandResult(
                ok=partition.clean and partition.state == "free",
                error="" if partition.clean else f"partition {partition.state}: {partition.reason}",
                exit_code=ExitCode.OK if partition.clean else ExitCode.QUARANTINED,
                partition=partition,
                scrub_certificate_json=await self._certificate_of(partition.uuid, lease_id),
            )
        if kind == "apply_layout":
            layout = admin_pb.LayoutRequest(targets=list(envelope.apply_layout.targets))
            response = await target.layout(layout, True)
            # An after_apply hook that failed: the layout stays applied, the command says so.
            failed = [hook.error for hook in response.hooks if not hook.ok]
            if failed:
                return pb.CommandResult(
                    ok=False, exit_code=ExitCode.FAILED, layout=response,
                    error=f"{'; '.join(failed)}; the layout was applied and stays",
                )  # fmt: skip
            return pb.CommandResult(ok=True, layout=response)
        if kind in ("quarantine_partition", "clear_partition"):
            action = getattr(envelope, kind)
            request_ = admin_pb.PartitionActionRequest(
                partition_uuid=action.partition_uuid, reason=action.reason
            )
            run = target.quarantine if kind == "quarantine_partition" else target.clear
            return pb.CommandResult(ok=True, partition=await run(request_))
        if kind == "attest":
            if self._attester is None:
                return pb.CommandResult(
                    ok=False, error="this node has no TPM configured for attestation",
                    exit_code=ExitCode.FAILED,
                )  # fmt: skip
            evidence = await self._attester.attest(envelope.attest)
            return pb.CommandResult(ok=True, attestation=evidence)
        if kind in ("cordon", "uncordon"):
            reason = getattr(envelope, kind).reason
            await self._executor.call(self._log.set_cordoned, kind == "cordon", reason)
            log.warning("node_cordoned" if kind == "cordon" else "node_uncordoned", reason=reason)
            return pb.CommandResult(ok=True, detail=f"{kind}ed")
        if kind == "rotate_certificate":
            self._renew_certificate()
            return pb.CommandResult(ok=True, detail="certificate renewal requested")
        if kind == "announce_command_key":
            key_id = await self._executor.call(self._keyring.install, envelope.announce_command_key)
            log.warning("command_key_rotated", key_id=key_id)
            return pb.CommandResult(ok=True, detail=f"command key {key_id} pinned")
        # validate_command_body refused anything else already; keep the set closed here too.
        raise CommandRefusedError(RefusalReason.UNKNOWN_BODY, f"command refused: {kind!r}")

    async def _certificate_of(self, partition_uuid: str, lease_id: str) -> str:
        if not partition_uuid:
            return ""
        try:
            listing = await self._target.certificates(
                admin_pb.ListCertificatesRequest(partition_uuid=partition_uuid)
            )
        except AccelguardError:
            return ""
        for text in reversed(listing.certificates):
            document: Any = json.loads(text)
            payload = document.get("payload", {}) if isinstance(document, dict) else {}
            if payload.get("previous_lease_id") == lease_id:
                return text
        return ""
