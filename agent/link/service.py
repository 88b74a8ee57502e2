"""The node's end of the controller link: one service, ``LinkService.run()``, under the daemon.

Invariants:

* A report exists once it is in the outbox (agent/store.py ``Outbox``, same journal, same
  fsync discipline); ``publish`` returns only then. Nothing is sent that is not stored first.
* Reports go out in seq order; on every connection the controller's HelloReply says the highest
  seq it holds for this node's epoch and sending resumes after it. The controller deduplicates by
  (node, epoch, seq), so resending after a lost ack is harmless.
* An ack removes health samples and inventory snapshots; lease events, scrub certificates,
  attestation and command results stay acked for ``retention_s``, so a controller restored from
  an older backup asks for them again and gets them.
* Disconnected, the node keeps working: reports accumulate within the outbox's bounds;
  reconnection uses full-jitter exponential backoff; HTTP/2 keepalive finds a dead peer in
  about keepalive_time_s + keepalive_timeout_s.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final, Protocol

import grpc
import structlog
from cryptography import x509

from agent import __version__
from agent.config import Config
from agent.errors import AccelguardError, IdentityError, LinkError, LinkProtocolError
from agent.identity.tls import (
    IdentityPaths,
    check_issued_certificate,
    load_certificate_der,
    load_identity,
    load_key,
    make_csr,
    store_certificate,
)
from agent.link.backoff import Backoff
from agent.link.channel import NODE_LINK_METHOD, client_options
from agent.link.flight import Flight, acks_come
from agent.link.mqtt import connected as mqtt_connected
from agent.link.reports import (
    GpuLike,
    health_sample,
    inventory_snapshot,
    kind_of,
    opens_lease,
    scrub_certificate,
)
from agent.link.wire import decode_downlink
from agent.proto.accelguard.v1 import admin_pb2 as admin_pb
from agent.proto.accelguard.v1 import link_pb2 as pb
from agent.runtime.executor import BlockingExecutor
from agent.runtime.tasks import cancel_and_wait
from agent.store import Store
from agent.store.outbox import Outbox, OutboxEntry, OutboxLimits

log = structlog.get_logger(__name__)

# What ends a connection (and is retried): the session's tasks raise these, alone or grouped.
# grpc.aio raises asyncio.InvalidStateError from write() on a call that already failed.
_LINK_FAILURES = (AccelguardError, grpc.RpcError, grpc.aio.BaseError, asyncio.InvalidStateError)

# Reports sent but not yet acked, at most: bounds what a slow controller makes the node buffer
# in gRPC (the outbox holds everything anyway).
SEND_WINDOW: Final = 512
READ_BATCH: Final = 128
# A connection that lasted this long resets the backoff: the next failure starts short again.
STABLE_AFTER_S: Final = 10.0
CERTIFICATE_POLL_S: Final = 0.5
PURGE_EVERY_S: Final = 3600.0
RENEWAL_RETRY_S: Final = 60.0
NOT_ENROLLED_POLL_S: Final = 1.0
# While on MQTT, gRPC is probed this often once it answers (with backoff while it does not).
PROBE_INTERVAL_S: Final = 1.0
PROBE_TIMEOUT_S: Final = 5.0
# While gRPC does not answer, probes back off (full jitter) up to this, not to backoff_cap_s:
# failback must follow within about failback_after_s of gRPC coming back. A probe is one TLS
# handshake, refused at the firewall or answered by the controller's gRPC server.
PROBE_BACKOFF_CAP_S: Final = 1.0


class SnapshotLike(Protocol):
    @property
    def driver_version(self) -> str: ...
    @property
    def gpus(self) -> Any: ...  # a sequence of GpuLike


class CommandSink(Protocol):
    """Where commands from the controller go (agent/link/commands.py ``CommandService``)."""

    def submit(self, data: bytes) -> None: ...


class HealthView(Protocol):
    """The health monitor's summary: GPU UUID -> (state, reset required), unhealthy GPUs only."""

    def gpu_summary(self) -> dict[str, tuple[str, bool]]: ...

    def gpu_samples(self) -> list[tuple[str, float, float, int]]: ...


class InventoryView(Protocol):
    """What the link reads of the inventory service: its latest snapshot (no hardware call)."""

    @property
    def snapshot(self) -> SnapshotLike: ...


BOOT_ID_FILE: Final = Path("/proc/sys/kernel/random/boot_id")


def boot_id(path: Path = BOOT_ID_FILE) -> str:
    try:
        return path.read_text().strip()[:64]
    except OSError:
        return ""


class LinkService:
    def __init__(
        self,
        config: Config,
        store: Store,
        executor: BlockingExecutor,
        inventory: InventoryView | None = None,
    ) -> None:
        self._config = config
        self._settings = config.link
        self._store = store
        self._executor = executor
        self._inventory = inventory
        self._paths = IdentityPaths(
            self._settings.cert_dir,
            Path(self._settings.ca_file) if self._settings.ca_file else None,
        )
        self.outbox = Outbox(
            store,
            OutboxLimits(
                max_reports=self._settings.outbox_max_reports,
                max_bytes=self._settings.outbox_max_bytes,
                grant_reserve=self._settings.outbox_grant_reserve,
                retention_s=self._settings.retention_s,
            ),
        )
        self._wake = asyncio.Event()
        self._started = time.monotonic()
        self._inventory_digest = b""
        self.connected = False
        self.connections = 0
        self.last_error = ""
        # The transport in use ("grpc" or "mqtt", docs/edge.md) and how often each was taken.
        self.transport = "grpc"
        self.failovers = 0
        self.failbacks = 0
        # Set while the MQTT session is being ended for gRPC (not for a shutdown).
        self._failing_back = False
        self._renewal_sent_at = 0.0
        # Set by the daemon once the admin handlers exist: commands from the controller.
        self.commands: CommandSink | None = None
        # Set by the daemon when the health monitor runs: each GPU's health in the inventory.
        self.health: HealthView | None = None
        self._renewal_asked = asyncio.Event()

    def wake(self) -> None:
        """Something new is in the outbox (written by another service): send it now."""
        self._wake.set()

    async def link_status(self) -> admin_pb.LinkStatus:
        stats = await self._executor.call(self.outbox.stats)
        return admin_pb.LinkStatus(
            configured=True,
            connected=self.connected,
            transport=self.transport,
            fallback_enabled=self._settings.fallback_enabled(self._config.node.profile),
            unacked=stats.unacked,
            failovers=self.failovers,
            failbacks=self.failbacks,
            last_error=self.last_error[:1024],
        )

    def request_renewal(self) -> None:
        """Ask the controller for a new certificate now (the rotate-certificate command)."""
        self._renewal_asked.set()

    # -- ReportSink ------------------------------------------------------------------------------

    async def publish(self, report: pb.Report) -> int | None:
        """Store ``report`` in the outbox (see ``ReportSink``); its seq, None if dropped."""
        kind = kind_of(report)
        body = report.SerializeToString()
        seq = await self._executor.call(
            self.outbox.enqueue,
            kind.value,
            body,
            droppable=kind.droppable,
            opens_lease=opens_lease(report),
        )
        self._wake.set()
        return seq

    # -- running -----------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._produce(), name="link-produce")
            group.create_task(self._connect_forever(), name="link-connect")

    async def _produce(self) -> None:
        """The node's own reports: heartbeats, inventory on change, new scrub certificates."""
        next_heartbeat = 0.0
        next_purge = time.monotonic() + PURGE_EVERY_S
        while True:
            now = time.monotonic()
            try:
                copied = await self._executor.call(
                    self.outbox.enqueue_new_certificates,
                    lambda document: scrub_certificate(document).SerializeToString(),
                )
                if copied:
                    self._wake.set()
                if now >= next_heartbeat:
                    next_heartbeat = now + self._settings.heartbeat_s
                    await self._heartbeat()
                    await self._inventory_if_changed(force=False)
                if now >= next_purge:
                    next_purge = now + PURGE_EVERY_S
                    await self._executor.call(self.outbox.purge_expired)
            except AccelguardError as error:
                # An outbox that is full of never-dropped reports, or a journal write that
                # failed: keep trying, the controller may drain it.
                log.warning("link_produce_failed", error=str(error))
            except Exception:
                # As above: the link's own reports are not worth stopping the daemon for.
                log.exception("link_produce_internal_error")
            await asyncio.sleep(min(CERTIFICATE_POLL_S, self._settings.heartbeat_s))

    async def _heartbeat(self) -> None:
        stats = await self._executor.call(self.outbox.stats)
        gpus = self.health.gpu_samples() if self.health is not None else []
        await self.publish(
            health_sample(time.monotonic() - self._started, stats.unacked, stats.dropped, gpus)
        )

    async def _inventory_if_changed(self, *, force: bool) -> None:
        if self._inventory is None:
            return
        snapshot = self._inventory.snapshot
        partitions = await self._executor.call(self._store.partitions)
        gpus: list[GpuLike] = list(snapshot.gpus)
        health = self.health.gpu_summary() if self.health is not None else None
        report = inventory_snapshot(snapshot.driver_version, gpus, partitions, health)
        digest = hashlib.sha256(report.inventory.SerializeToString(deterministic=True)).digest()
        if force or digest != self._inventory_digest:
            await self.publish(report)
            self._inventory_digest = digest

    async def _connect_forever(self) -> None:
        if not self._settings.fallback_enabled(self._config.node.profile):
            await self._grpc_until_unreachable(None)
            return
        while True:
            self.transport = "grpc"
            await self._grpc_until_unreachable(self._settings.fallback_after_s)
            self.failovers += 1
            self.transport = "mqtt"
            log.warning("link_fallback", transport="mqtt", broker=self._settings.mqtt_broker,
                        after_s=self._settings.fallback_after_s)  # fmt: skip
            await self._mqtt_until_grpc_healthy()
            self.failbacks += 1
            log.info("link_failback", transport="grpc")

    async def _grpc_until_unreachable(self, fallback_after_s: float | None) -> None:
        """Dial gRPC with backoff, forever or until it has been unreachable this long."""
        backoff = Backoff(self._settings.backoff_base_s, self._settings.backoff_cap_s)
        down_since: float | None = None
        while True:
            started = time.monotonic()
            connections = self.connections
            enrolled = await self._attempt(self._session)
            now = time.monotonic()
            if self.connections != connections:
                down_since = now  # it was up: unreachable from now on
            elif down_since is None:
                down_since = started
            if not enrolled:
                await asyncio.sleep(NOT_ENROLLED_POLL_S)
                continue
            if now - started >= STABLE_AFTER_S:
                backoff.reset()
            delay = backoff.next_delay()
            if fallback_after_s is not None:
                left = down_since + fallback_after_s - now
                if left <= 0:
                    return
                delay = min(delay, left)
            await asyncio.sleep(delay)

    async def _mqtt_until_grpc_healthy(self) -> None:
        """Carry the link over MQTT while probing gRPC; return once gRPC has answered every
        probe for failback_after_s (the MQTT session is then ended cleanly)."""
        mqtt = asyncio.create_task(self._mqtt_forever(), name="link-mqtt")
        try:
            await self._probe_until_healthy()
            self._failing_back = True
        finally:
            await cancel_and_wait(mqtt)
            self._failing_back = False

    async def _mqtt_forever(self) -> None:
        backoff = Backoff(self._settings.backoff_base_s, self._settings.backoff_cap_s)
        while True:
            started = time.monotonic()
            if not await self._attempt(self._mqtt_session):
                await asyncio.sleep(NOT_ENROLLED_POLL_S)
                continue
            if time.monotonic() - started >= STABLE_AFTER_S:
                backoff.reset()
            await asyncio.sleep(backoff.next_delay())

    async def _probe_until_healthy(self) -> None:
        cap = min(self._settings.backoff_cap_s, PROBE_BACKOFF_CAP_S)
        backoff = Backoff(min(self._settings.backoff_base_s, cap), cap)
        healthy_since: float | None = None
        while True:
            if await self._probe_grpc():
                backoff.reset()
                now = time.monotonic()
                healthy_since = now if healthy_since is None else healthy_since
                if now - healthy_since >= self._settings.failback_after_s:
                    return
                await asyncio.sleep(min(PROBE_INTERVAL_S, self._settings.failback_after_s))
            else:
                healthy_since = None
                await asyncio.sleep(backoff.next_delay())

    async def _probe_grpc(self) -> bool:
        """Whether the controller's gRPC endpoint completes a mutual-TLS HTTP/2 handshake."""
        try:
            credentials = await self._credentials()
        except (IdentityError, OSError):
            return False
        async with grpc.aio.secure_channel(self._settings.controller, credentials) as channel:
            try:
                async with asyncio.timeout(PROBE_TIMEOUT_S):
                    await channel.channel_ready()
            except TimeoutError:
                return False
        return True

    async def _attempt(self, session: Callable[[], Awaitable[None]]) -> bool:
        """One session on one transport, its failure logged; False when not enrolled."""
        enrolled = True
        try:
            await session()
        except* IdentityError as group:
            # Not enrolled (yet): nothing to dial with. Looking for the files is cheap, so
            # look often: the link comes up right after `accelguard enroll`.
            self._note_failure("link_not_enrolled", _first(group))
            enrolled = False
        except* _LINK_FAILURES as group:
            self._note_failure("link_disconnected", _first(group))
        except* Exception as group:
            # A bug in the link must not stop the daemon (leases, scrubs, fences): log it
            # with its traceback and dial again after the backoff.
            log.exception("link_internal_error", exc_info=_first(group))
        finally:
            self.connected = False
        return enrolled

    def _note_failure(self, event: str, error: BaseException) -> None:
        text = _describe(error)
        if text != self.last_error:
            log.warning(event, error=text)
        self.last_error = text

    async def _credentials(self) -> grpc.ChannelCredentials:
        identity = await self._executor.call(load_identity, self._paths)
        return grpc.ssl_channel_credentials(
            root_certificates=identity.ca_pem,
            private_key=identity.key_pem,
            certificate_chain=identity.certificate_pem,
        )

    async def _session(self) -> None:
        credentials = await self._credentials()
        options = client_options(
            self._settings.keepalive_time_s, self._settings.keepalive_timeout_s
        )
        async with grpc.aio.secure_channel(
            self._settings.controller, credentials, options=options
        ) as channel:
            call = channel.stream_stream(NODE_LINK_METHOD)()
            try:
                await self._converse(call)
            finally:
                call.cancel()

    async def _mqtt_session(self) -> None:
        await self._executor.call(load_identity, self._paths)  # IdentityError: not enrolled
        async with mqtt_connected(
            node_id=self._config.node.id,
            broker=self._settings.mqtt_broker,
            paths=self._paths,
            session_expiry_s=self._settings.mqtt_session_expiry_s,
            keepalive_s=self._settings.mqtt_keepalive_s,
        ) as call:
            try:
                await self._converse(call)
            except asyncio.CancelledError:
                if self._failing_back:
                    call.leaving_for = "grpc"
                raise

    async def _converse(self, call: Any) -> None:
        epoch = await self._executor.call(self.outbox.epoch)
        last_seq = await self._executor.call(self.outbox.last_seq)
        hello = pb.Uplink(
            hello=pb.Hello(
                agent_version=__version__,
                boot_id=boot_id(self._config.attest.boot_id_file),
                epoch=epoch,
                last_seq=last_seq,
            )
        )
        await call.write(hello.SerializeToString())
        try:
            async with asyncio.timeout(self._config.link.hello_reply_timeout_s):
                first = await call.read()
        except TimeoutError:
            raise LinkError(
                f"no HelloReply within {self._config.link.hello_reply_timeout_s:g} s"
            ) from None
        if first is grpc.aio.EOF:
            raise LinkError(f"the controller closed the link: {await _status(call)}")
        reply = decode_downlink(first)
        if reply.WhichOneof("message") == "closed":
            raise LinkError(f"the controller ended the session: {_closed(reply.closed)}")
        if reply.WhichOneof("message") != "hello":
            raise LinkProtocolError("the controller's first message is not a HelloReply")
        resume_after = reply.hello.resume_after
        if resume_after > last_seq:
            # It holds numbers this epoch never assigned: not ours (or a bug); never let its
            # dedupe swallow our reports silently.
            raise LinkProtocolError(
                f"the controller says it holds up to seq {resume_after} of epoch {epoch}, but "
                f"this node only assigned up to {last_seq}"
            )
        self.connected = True
        self.connections += 1
        self.last_error = ""
        log.info("link_connected", controller=self._settings.controller,
                 resume_after=resume_after, last_seq=last_seq)  # fmt: skip
        # Inventory on every connect: the controller may have missed changes while we were away.
        await self._inventory_if_changed(force=True)
        acked = asyncio.Event()
        state = Flight(acked=resume_after, sent=resume_after)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._receive(call, state, acked))
            group.create_task(self._send(call, resume_after, state, acked))
            group.create_task(self._renewal(call))
            group.create_task(acks_come(state, self._ack_limit_s()))

    async def _send(self, call: Any, cursor: int, state: Flight, acked: asyncio.Event) -> None:
        while True:
            self._wake.clear()
            entries: list[OutboxEntry] = await self._executor.call(
                self.outbox.pending, cursor, READ_BATCH
            )
            if not entries:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._settings.heartbeat_s):
                        await self._wake.wait()
                continue
            for entry in entries:
                while entry.seq - state.acked > SEND_WINDOW:
                    acked.clear()
                    await acked.wait()
                # A stored body is a Report with only its oneof set; protobuf merges
                # concatenated encodings, so the header fields are appended without re-encoding.
                report = pb.Report()
                report.ParseFromString(
                    pb.Report(
                        seq=entry.seq, created_at=entry.created_at, after_seq=cursor
                    ).SerializeToString()
                    + entry.body
                )
                await call.write(pb.Uplink(report=report).SerializeToString())
                cursor = entry.seq
                state.sent_report(entry.seq)

    def _ack_limit_s(self) -> float:
        """How long sent reports may wait for an ack: what the controller has to answer a Hello,
        plus what HTTP/2 keepalive grants a peer before it counts as dead."""
        link = self._settings
        return link.hello_reply_timeout_s + link.keepalive_time_s + link.keepalive_timeout_s

    async def _receive(self, call: Any, state: Flight, acked: asyncio.Event) -> None:
        while True:
            data = await call.read()
            if data is grpc.aio.EOF:
                raise LinkError(f"the controller ended the link: {await _status(call)}")
            message = decode_downlink(data)
            which = message.WhichOneof("message")
            if which == "ack":
                seq = message.ack.seq
                if seq > state.acked:
                    state.heard()
                    await self._executor.call(self.outbox.ack_through, seq)
                    state.acked = seq
                    acked.set()
            elif which == "closed":
                raise LinkError(f"the controller ended the session: {_closed(message.closed)}")
            elif which == "certificate":
                await self._executor.call(self._install_certificate, message.certificate)
            elif which == "command":
                if self.commands is None:
                    log.warning("link_command_ignored", reason="this agent runs no commands")
                else:
                    # The exact bytes that came: the envelope inside is what was signed.
                    self.commands.submit(message.command.SerializeToString())
            # Anything else (a newer controller's messages) is not for this version: ignored.

    async def _renewal(self, call: Any) -> None:
        """Ask for a new certificate at two thirds of the current one's life, over this link
        (the current one stays valid until it expires: a failed renewal is asked again)."""
        while True:
            identity = await self._executor.call(load_identity, self._paths)
            wait = identity.renew_at - time.time()
            if wait > 0 and not self._renewal_asked.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(wait, 3600.0)):
                        await self._renewal_asked.wait()
                continue
            self._renewal_asked.clear()
            key = await self._executor.call(load_key, self._paths.key)
            csr = make_csr(key, self._config.node.id)
            log.info("link_certificate_renewal_requested")
            await call.write(pb.Uplink(renew=pb.RenewCertificate(csr=csr)).SerializeToString())
            await asyncio.sleep(RENEWAL_RETRY_S)

    def _install_certificate(self, issued: pb.EnrolledCertificate) -> None:
        identity = load_identity(self._paths)
        certificate = load_certificate_der(issued.certificate, "renewed certificate")
        ca = x509.load_pem_x509_certificate(identity.ca_pem)
        check_issued_certificate(certificate, load_key(self._paths.key), ca, identity.node_id)
        store_certificate(self._paths, certificate)
        log.info(
            "link_certificate_renewed",
            not_after=certificate.not_valid_after_utc.isoformat(),
        )


async def _status(call: Any) -> str:
    with contextlib.suppress(Exception):
        code = await call.code()
        details = await call.details()
        return f"{code.name}: {details}"
    return "no status"


def _closed(closed: pb.Closed) -> str:
    return f"{closed.code}: {closed.detail}" if closed.detail else closed.code


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error)


def sink_callable(service: LinkService) -> Callable[[pb.Report], Any]:
    return service.publish
