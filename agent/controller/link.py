"""The controller's end of ``NodeLink.Connect``.

Identity: the node is who its client certificate's URI SAN says (verified by mutual TLS against
the controller CA), never what a message says; a report whose content names another node is
refused. Each stream: Hello -> HelloReply(resume_after = highest seq held for the node's epoch),
then reports in strictly increasing seq, each validated (agent/link/wire.py, scrub certificates
against the node's enrolled key) before it is queued for commit; an Ack(seq) goes out only once
every report up to seq is committed. A malformed or refused message ends the stream with a
status saying why, and nothing of it is stored.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.audit.checkpoint import from_message, signature_valid
from agent.controller.command_store import CommandOutcome
from agent.controller.commands import CommandDispatcher
from agent.controller.committer import ReportCommitter
from agent.controller.config import ControllerSection
from agent.controller.enrollment import EnrollmentAuthority
from agent.controller.pki import ControllerPki
from agent.controller.store import ControllerStore, IncomingReport, NodeRecord, StoredCertificate
from agent.errors import (
    AccelguardError,
    EnrollmentRefusedError,
    LinkError,
    LinkProtocolError,
    ScrubError,
)
from agent.identity.spiffe import node_id_of
from agent.link.wire import decode_uplink
from agent.proto.accelguard.v1 import link_pb2 as pb
from agent.runtime.executor import BlockingExecutor
from agent.scrub.certificate import canonical_json, verify_certificate

log = structlog.get_logger(__name__)

HELLO_TIMEOUT_S: Final = 30.0
# Reports a stream may have queued for commit before the controller stops reading it: TCP
# backpressure then slows the node down instead of the controller's memory growing.
MAX_IN_FLIGHT: Final = 4096


class IdentityClaimError(LinkProtocolError):
    """A message claims to be from (or about) another node than the certificate's."""


@dataclass
class Session:
    node_id: str
    task: asyncio.Task[Any]
    started_at: float
    transport: str = "grpc"


class NodeLinkHandler:
    def __init__(
        self,
        store: ControllerStore,
        executor: BlockingExecutor,
        committer: ReportCommitter,
        pki: ControllerPki,
        authority: EnrollmentAuthority,
        settings: ControllerSection,
        dispatcher: CommandDispatcher | None = None,
    ) -> None:
        self._store = store
        self._dispatcher = dispatcher
        # Called with the node id once its stream is up (the attestation loop asks for a quote).
        self.connect_hooks: list[Callable[[str], None]] = []
        self._executor = executor
        self._committer = committer
        self._pki = pki
        self._authority = authority
        self._settings = settings
        self.sessions: dict[str, Session] = {}
        self.streams_opened = 0
        self.streams_closed = 0
        self._replaced: dict[asyncio.Task[Any], bool] = {}
        self._background: set[asyncio.Task[None]] = set()

    def identity(self, context: Any) -> str:
        certificates = context.auth_context().get("x509_pem_cert") or []
        if len(certificates) != 1:
            raise IdentityClaimError("no client certificate: the link needs the node's certificate")
        try:
            certificate = x509.load_pem_x509_certificate(certificates[0])
        except ValueError as error:
            raise IdentityClaimError(f"client certificate unreadable: {error}") from None
        return node_id_of(certificate, self._pki.trust_domain)

    async def connect(self, requests: AsyncIterator[bytes], context: Any) -> None:
        """The gRPC stream: the node is who its client certificate says."""
        try:
            node_id = self.identity(context)
        except IdentityClaimError as error:
            log.warning("link_refused", reason=str(error))
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(error))
            return

        async def send(message: pb.Downlink) -> None:
            await context.write(message)

        closed = await self.serve(node_id, requests, send, "grpc")
        if closed is not None:
            await context.abort(*closed)

    async def serve(
        self,
        node_id: str,
        requests: AsyncIterator[bytes],
        send: Callable[[pb.Downlink], Awaitable[None]],
        transport: str,
    ) -> tuple[grpc.StatusCode, str] | None:
        """One session of an authenticated node, whichever transport carries it (the gRPC
        stream, or the MQTT bridge where the broker authenticated the node): None when the
        node ended it, otherwise the status it is ended with and why."""
        self.streams_opened += 1
        try:
            await self._serve(node_id, requests, send, transport)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or not self._replaced.pop(task, False):
                raise
            task.uncancel()
            return grpc.StatusCode.ABORTED, "replaced: this node opened a newer session"
        except IdentityClaimError as error:
            log.warning("link_refused", node=node_id, reason=str(error))
            return grpc.StatusCode.PERMISSION_DENIED, str(error)
        except LinkProtocolError as error:
            log.warning("link_protocol_error", node=node_id, reason=str(error))
            return grpc.StatusCode.INVALID_ARGUMENT, str(error)
        except AccelguardError as error:
            log.error("link_failed", node=node_id, error=str(error))  # noqa: TRY400
            return grpc.StatusCode.UNAVAILABLE, str(error)
        finally:
            self.streams_closed += 1
        return None

    async def _serve(
        self,
        node_id: str,
        requests: AsyncIterator[bytes],
        send: Callable[[pb.Downlink], Awaitable[None]],
        transport: str,
    ) -> None:
        node = await self._executor.call(self._store.node, node_id)
        if node is None:
            raise IdentityClaimError(f"node {node_id} is not enrolled at this controller")
        iterator = aiter(requests)
        try:
            async with asyncio.timeout(HELLO_TIMEOUT_S):
                first = await anext(iterator)
        except (StopAsyncIteration, TimeoutError):
            raise LinkProtocolError("the stream must start with Hello") from None
        hello_message = decode_uplink(first)
        if hello_message.WhichOneof("message") != "hello":
            raise LinkProtocolError("the stream must start with Hello")
        hello = hello_message.hello
        resume = await self._executor.call(
            self._store.record_hello, node_id, hello.agent_version, hello.boot_id, hello.epoch
        )
        previous = self.sessions.get(node_id)
        current = asyncio.current_task()
        if current is None:  # pragma: no cover - handlers always run in a task
            raise LinkError("link handler outside a task")
        if previous is not None and previous.task is not current:
            # The node dialled again: its old stream is half-dead (NAT, a stalled path).
            self._replaced[previous.task] = True
            previous.task.cancel()
        self.sessions[node_id] = Session(node_id, current, time.time(), transport)
        log.info("node_connected", node=node_id, epoch=hello.epoch, resume_after=resume,
                 node_last_seq=hello.last_seq, transport=transport)  # fmt: skip
        writing = asyncio.Lock()

        async def write(message: pb.Downlink) -> None:
            async with writing:
                await send(message)

        acker: asyncio.Task[None] | None = None
        try:
            await write(
                pb.Downlink(hello=pb.HelloReply(resume_after=resume, server_time=time.time()))
            )
            if self._dispatcher is not None:
                await self._dispatcher.node_connected(node_id, write)
            for hook in self.connect_hooks:
                hook(node_id)
            verifier = _NodeVerifier(node)
            in_flight: asyncio.Queue[tuple[int, asyncio.Future[bool]]] = asyncio.Queue(
                MAX_IN_FLIGHT
            )
            acker = asyncio.create_task(self._ack(in_flight, write), name=f"ack-{node_id}")
            async with contextlib.aclosing(_until_done(iterator, acker)) as messages:
                await self._receive(
                    node_id, hello.epoch, resume, messages, verifier, in_flight, write
                )
            await in_flight.put((0, _done_future()))
            await acker
        finally:
            if self._dispatcher is not None:
                self._dispatcher.node_disconnected(node_id, write)
            if self.sessions.get(node_id) is not None and self.sessions[node_id].task is current:
                del self.sessions[node_id]
                log.info("node_disconnected", node=node_id)
            if acker is not None:
                acker.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await acker

    async def _receive(
        self,
        node_id: str,
        epoch: int,
        resume: int,
        messages: AsyncIterator[bytes],
        verifier: _NodeVerifier,
        in_flight: asyncio.Queue[tuple[int, asyncio.Future[bool]]],
        write: Any,
    ) -> None:
        last_seq = resume
        async for data in messages:
            message = decode_uplink(data)
            which = message.WhichOneof("message")
            if which == "report":
                report = message.report
                if report.seq <= last_seq:
                    raise LinkProtocolError(
                        f"report seq {report.seq} after {last_seq}: seqs must increase"
                    )
                if report.after_seq != last_seq:
                    # The outbox may skip seqs (dropped reports), a transport may not lose one:
                    # end the session, the node resumes after what is stored.
                    raise LinkProtocolError(
                        f"report {report.seq} follows {report.after_seq}, but the last report "
                        f"of this session was {last_seq}: a report went missing in transit"
                    )
                last_seq = report.seq
                incoming = verifier.incoming(report, epoch)
                future = self._committer.submit(incoming)
                if incoming.command is not None and self._dispatcher is not None:
                    future.add_done_callback(
                        functools.partial(self._result_committed, incoming.command.command_id)
                    )
                await in_flight.put((report.seq, future))
            elif which == "renew":
                await write(pb.Downlink(certificate=await self._renew(node_id, message.renew)))
            else:
                raise LinkProtocolError("Hello may only be sent once per stream")

    def _result_committed(self, command_id: bytes, future: asyncio.Future[bool]) -> None:
        if future.cancelled() or future.exception() is not None or self._dispatcher is None:
            return
        if not future.result():
            return  # not the result kept (a re-delivery's duplicate answer, a resent report)
        task = asyncio.get_running_loop().create_task(self._dispatcher.result_stored(command_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _ack(
        self,
        in_flight: asyncio.Queue[tuple[int, asyncio.Future[bool]]],
        write: Any,
    ) -> None:
        while True:
            seq, future = await in_flight.get()
            await future  # a failed commit ends the stream: nothing after it is acked
            if seq == 0:
                return
            highest = seq
            # Everything already committed goes out in one cumulative ack.
            while not in_flight.empty():
                next_seq, next_future = in_flight._queue[0]  # type: ignore[attr-defined]
                if not next_future.done():
                    break
                in_flight.get_nowait()
                next_future.result()
                if next_seq == 0:
                    await write(pb.Downlink(ack=pb.Ack(seq=highest)))
                    return
                highest = next_seq
            await write(pb.Downlink(ack=pb.Ack(seq=highest)))

    async def _renew(self, node_id: str, renew: pb.RenewCertificate) -> pb.EnrolledCertificate:
        try:
            issued = self._pki.sign_node(renew.csr, node_id, self._settings.node_cert_lifetime_s)
        except EnrollmentRefusedError as error:
            raise LinkProtocolError(f"certificate renewal refused: {error}") from None
        await self._executor.call(
            self._store.renew_certificate, node_id, issued.serial, issued.not_after
        )
        node = await self._executor.call(self._store.node, node_id)
        attested = node is not None and node.attestation == "attested"
        log.info("node_certificate_renewed", node=node_id, serial=issued.serial)
        return self._authority.certificate_message(issued.der, node_id, issued.spiffe_id, attested)


def _done_future() -> asyncio.Future[bool]:
    future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    future.set_result(False)
    return future


async def _until_done(
    iterator: AsyncIterator[bytes], acker: asyncio.Task[None]
) -> AsyncGenerator[bytes, None]:
    """The stream's messages, ending early (with its error) when the acker failed."""
    while True:
        read = asyncio.ensure_future(anext(iterator))
        # A read that ends (StopAsyncIteration, a transport error) after the stream was given up
        # must not be reported as "exception never retrieved".
        read.add_done_callback(_retrieve)
        try:
            done, _ = await asyncio.wait({read, acker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Cancelled (the stream replaced, the server stopping): leave no read behind.
            if not read.done():
                read.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await read
        if read not in done:
            acker.result()  # raises the commit error
            return
        try:
            data = read.result()
        except StopAsyncIteration:
            return
        yield data


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _NodeVerifier:
    """Checks one node's reports against what it enrolled."""

    def __init__(self, node: NodeRecord) -> None:
        self.node = node
        key = serialization.load_pem_public_key(node.scrub_key_pem.encode("ascii"))
        # Enrollment accepts only an Ed25519 node key; None (never seen) refuses its checkpoints.
        self.node_key = key if isinstance(key, Ed25519PublicKey) else None
        # The PEM exactly as certificate.py writes it (verification compares it with the
        # document's embedded key).
        self.scrub_key_pem = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    def incoming(self, report: pb.Report, epoch: int) -> IncomingReport:
        kind = report.WhichOneof("body")
        if kind is None:  # pragma: no cover - validate_report refuses it first
            raise LinkProtocolError(f"report {report.seq}: no body")
        inventory = None
        certificate = None
        command = None
        if kind == "command_result":
            result = report.command_result
            command = CommandOutcome(
                command_id=bytes(result.command_id),
                result=result.SerializeToString(),
                ok=result.ok,
                refusal=result.refusal,
                detail=result.error or result.detail,
            )
        if kind == "audit_checkpoint":
            self._audit_checkpoint(report)
        if kind == "inventory":
            inventory = report.inventory.SerializeToString()
        elif kind == "scrub_certificate":
            certificate = self._certificate(report)
        return IncomingReport(
            node_id=self.node.node_id,
            epoch=epoch,
            seq=report.seq,
            kind=kind,
            created_at=report.created_at,
            body=report.SerializeToString(),
            inventory=inventory,
            certificate=certificate,
            command=command,
        )

    def _audit_checkpoint(self, report: pb.Report) -> None:
        """Kept only when the node's enrolled key signed it (its history is judged by
        ``ctl audit verify``)."""
        message = report.audit_checkpoint
        if self.node_key is None or not signature_valid(
            self.node_key, self.node.node_id, from_message(message)
        ):
            raise LinkProtocolError(
                f"report {report.seq} (audit checkpoint {message.record_index}): refused, its "
                "signature does not verify with the node's enrolled key"
            )

    def _certificate(self, report: pb.Report) -> StoredCertificate:
        message = report.scrub_certificate
        where = f"report {report.seq} (scrub certificate)"
        try:
            payload = json.loads(message.canonical_payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            raise LinkProtocolError(f"{where}: payload is not JSON: {error}") from None
        if not isinstance(payload, dict):
            raise LinkProtocolError(f"{where}: payload is not a JSON object")
        document = {
            "payload": payload,
            "signature": base64.b64encode(message.signature).decode("ascii"),
            "public_key": self.scrub_key_pem,
            "algorithm": message.algorithm,
        }
        try:
            verified = verify_certificate(document, self.scrub_key_pem)
            canonical = canonical_json(payload)
        except ScrubError as error:
            raise LinkProtocolError(
                f"{where}: refused, its signature does not verify with the node's enrolled "
                f"key: {error}"
            ) from None
        if canonical != message.canonical_payload:
            raise LinkProtocolError(f"{where}: payload is not in canonical form")
        if verified.payload["node_id"] != self.node.node_id:
            raise IdentityClaimError(
                f"{where}: certificate is for node {str(verified.payload['node_id'])[:64]!r}, "
                f"but the link is node {self.node.node_id!r}'s"
            )
        return StoredCertificate(
            seq=report.seq,
            partition_uuid=str(verified.payload["partition_uuid"]),
            previous_lease_id=str(verified.payload["previous_lease_id"]),
            scrub_verified=verified.scrub_verified,
            signature_checked=True,
            finished_at=str(verified.payload["finished_at"]),
            payload=message.canonical_payload,
            signature=message.signature,
        )
