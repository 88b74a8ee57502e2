"""The controller's operator API: gRPC ``ControllerAdmin`` on a local Unix socket (0660), the
same conventions as the agent's admin socket. ``accelguard ctl`` is its only client."""

from __future__ import annotations

import asyncio
import grp
import hashlib
import json
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any, Final

import grpc
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.admin.peers import CallerGate, authorize
from agent.admin.unix_socket import serve_on_unix_socket
from agent.attest.policy import Policy
from agent.controller.attestation import AttestationLoop
from agent.controller.command_store import CommandRow, CommandState, TrustRecord
from agent.controller.commands import CommandDispatcher
from agent.controller.config import ControllerSection
from agent.controller.link import NodeLinkHandler
from agent.controller.mqtt_bridge import BrokerState
from agent.controller.pki import ControllerPki
from agent.controller.store import ControllerStore, NodeRecord
from agent.controller.tokens import create_token
from agent.errors import (
    AccelguardError,
    AdminApiError,
    NotFoundError,
    PermissionDeniedError,
    ValidationError,
)
from agent.link.envelope import MAX_TTL_S, command_key_id
from agent.proto.accelguard.v1 import controller_pb2 as pb
from agent.proto.accelguard.v1 import controller_pb2_grpc as pb_grpc
from agent.proto.accelguard.v1 import link_pb2
from agent.runtime.executor import BlockingExecutor
from agent.scrub.certificate import key_fingerprint

log = structlog.get_logger(__name__)


def _inventory(node: NodeRecord) -> link_pb2.InventorySnapshot:
    """The node's latest inventory (empty before its first)."""
    return link_pb2.InventorySnapshot.FromString(node.inventory)


class ControllerAdminHandlers:
    def __init__(
        self,
        settings: ControllerSection,
        store: ControllerStore,
        executor: BlockingExecutor,
        link: NodeLinkHandler,
        dispatcher: CommandDispatcher,
        attestation: AttestationLoop,
        pki: ControllerPki,
    ) -> None:
        self._pki = pki
        self._settings = settings
        self._store = store
        self._executor = executor
        self._link = link
        self._dispatcher = dispatcher
        self._attestation = attestation
        dispatcher.result_hooks.append(self._cordon_result)
        # The MQTT bridge's view of each node's state topic (agent/controller/mqtt_bridge.py).
        self.broker_states: Mapping[str, BrokerState] = {}

    def _broker_state(self, node_id: str) -> str:
        state = self.broker_states.get(node_id)
        if state is None:
            return ""
        return state.state if state.state == "offline" else f"{state.state} {state.transport}"

    def _summary(self, node: NodeRecord, reports: int, trust: TrustRecord) -> pb.NodeSummary:
        session = self._link.sessions.get(node.node_id)
        inventory = _inventory(node)
        states = Counter(p.state for p in inventory.partitions)
        return pb.NodeSummary(
            unhealthy_gpus=sum(1 for g in inventory.gpus if g.health not in ("", "healthy")),
            trust="unattested" if node.attestation != "attested" else trust.trust,
            cordoned=trust.cordoned,
            group=trust.group,
            node_id=node.node_id,
            connected=session is not None,
            transport=session.transport if session is not None else "",
            broker_state=self._broker_state(node.node_id),
            last_seen=node.last_seen,
            attestation=node.attestation,
            partitions=[pb.PartitionCount(state=s, count=c) for s, c in sorted(states.items())],
            agent_version=node.agent_version,
            reports=reports,
        )

    async def create_token(self, request: pb.CreateTokenRequest) -> pb.CreateTokenResponse:
        ttl = request.ttl_s or self._settings.token_ttl_s
        token, expires_at = await self._executor.call(
            create_token, self._store, request.node_id, ttl
        )
        log.info("token_created", node=request.node_id, expires_at=expires_at)
        return pb.CreateTokenResponse(token=token, node_id=request.node_id, expires_at=expires_at)

    async def list_nodes(self) -> pb.ListNodesResponse:
        def collect() -> list[tuple[NodeRecord, int, TrustRecord]]:
            return [
                (
                    n,
                    sum(self._store.report_counts(n.node_id).values()),
                    self._store.commands.trust(n.node_id),
                )
                for n in self._store.nodes()
            ]

        rows = await self._executor.call(collect)
        return pb.ListNodesResponse(
            nodes=[self._summary(n, count, trust) for n, count, trust in rows]
        )

    async def get_node(self, request: pb.GetNodeRequest) -> pb.NodeDetail:
        node = await self._executor.call(self._store.node, request.node_id)
        if node is None:
            raise NotFoundError(f"node {request.node_id!r} is not enrolled")
        counts = await self._executor.call(self._store.report_counts, node.node_id)
        trust = await self._executor.call(self._store.commands.trust, node.node_id)
        refusals = await self._executor.call(self._store.commands.refusals, node.node_id)
        health = await self._executor.call(
            self._store.recent_reports, node.node_id, "health_event", 20
        )
        return pb.NodeDetail(
            summary=self._summary(node, sum(counts.values()), trust),
            trust_reasons=list(trust.reasons),
            command_key_id=trust.command_key_id,
            health_events=[link_pb2.Report.FromString(body).health_event for body in health],
            last_attested_at=trust.last_attested_at,
            refusals=[
                pb.CommandRefusal(
                    command_id=r.command_id.hex(), reason=r.reason, detail=r.detail, at=r.at
                )
                for r in refusals
            ],
            spiffe_id=node.spiffe_id,
            enrolled_at=node.enrolled_at,
            ak_name_hex=node.ak_name.hex(),
            ek_public_sha256=hashlib.sha256(node.ek_public).hexdigest() if node.ek_public else "",
            scrub_key_fingerprint=key_fingerprint(node.scrub_key_pem),
            certificate_serial=node.cert_serial,
            certificate_not_after=node.cert_not_after,
            boot_id=node.boot_id,
            epoch=node.epoch,
            last_seq=0,
            partitions=[
                pb.NodePartition(
                    uuid=p.uuid,
                    kind=p.kind,
                    gpu_index=p.gpu_index,
                    profile=p.profile,
                    state=p.state,
                    clean=p.clean,
                    lease_id=p.lease_id,
                )
                for p in _inventory(node).partitions
            ],
            reports_by_kind=counts,
        )

    async def status(self) -> pb.ControllerStatus:
        """Process counters, read on the event loop (no storage, no executor)."""
        return pb.ControllerStatus(
            asyncio_tasks=len(asyncio.all_tasks()),
            sessions=len(self._link.sessions),
            streams_opened=self._link.streams_opened,
            streams_closed=self._link.streams_closed,
        )

    async def certificates(
        self, request: pb.ListNodeCertificatesRequest
    ) -> pb.ListNodeCertificatesResponse:
        node = await self._executor.call(self._store.node, request.node_id)
        if node is None:
            raise NotFoundError(f"node {request.node_id!r} is not enrolled")
        stored = await self._executor.call(self._store.certificates, request.node_id)
        import base64  # noqa: PLC0415 - only this call needs it

        return pb.ListNodeCertificatesResponse(
            certificates=[
                pb.StoredScrubCertificate(
                    seq=c.seq,
                    partition_uuid=c.partition_uuid,
                    previous_lease_id=c.previous_lease_id,
                    scrub_verified=c.scrub_verified,
                    signature_checked=c.signature_checked,
                    finished_at=c.finished_at,
                    payload_json=c.payload.decode("utf-8"),
                    signature_b64=base64.b64encode(c.signature).decode("ascii"),
                )
                for c in stored
            ]
        )

    async def audit_checkpoints(
        self, request: pb.ListAuditCheckpointsRequest
    ) -> pb.ListAuditCheckpointsResponse:
        """The node's audit checkpoints as received, checked as a history (docs/audit.md)."""
        from agent.audit.checkpoint import from_message  # noqa: PLC0415
        from agent.audit.verify import checkpoint_history  # noqa: PLC0415

        node = await self._executor.call(self._store.node, request.node_id)
        if node is None:
            raise NotFoundError(f"node {request.node_id!r} is not enrolled")
        received = await self._executor.call(
            self._store.reports_received, request.node_id, "audit_checkpoint"
        )
        stored = []
        history = []
        for item in received:
            message = link_pb2.Report.FromString(item.body).audit_checkpoint
            stored.append(
                pb.StoredAuditCheckpoint(
                    epoch=item.epoch, seq=item.seq, received_at=item.received_at,
                    checkpoint=message,
                )
            )  # fmt: skip
            history.append(from_message(message))
        key = serialization.load_pem_public_key(node.scrub_key_pem.encode("ascii"))
        if not isinstance(key, Ed25519PublicKey):  # pragma: no cover - enrollment checks it
            raise ValidationError(f"node {request.node_id}: its enrolled key is not Ed25519")
        findings = checkpoint_history(history, key, request.node_id)
        return pb.ListAuditCheckpointsResponse(
            node_id=request.node_id,
            checkpoints=stored,
            findings=[
                pb.AuditFinding(kind=f.kind, record=f.seq, message=f.message) for f in findings
            ],
        )

    # -- remote commands -------------------------------------------------------------------------

    async def run_command(self, request: pb.RunCommandRequest) -> pb.CommandStatus:
        kind = request.WhichOneof("body")
        if kind is None:
            raise ValidationError("a command needs a body (grant_lease, release_lease, ...)")
        node_id = request.node_id
        node = await self._executor.call(self._store.node, node_id)
        if node is None:
            raise NotFoundError(f"node {node_id!r} is not enrolled")
        ttl = request.ttl_s or self._settings.command_ttl_s
        if not 0 < ttl <= MAX_TTL_S:
            raise ValidationError(f"ttl must be more than 0 and at most {MAX_TTL_S:.0f} s")
        timeout = request.timeout_s or self._settings.command_timeout_s
        if not 0 < timeout <= 3600:
            raise ValidationError("timeout must be more than 0 and at most 3600 s")
        trust = await self._executor.call(self._store.commands.trust, node_id)
        if kind == "grant_lease" and trust.cordoned:
            raise ValidationError(
                f"node {node_id} is cordoned ({trust.trust}"
                + (": " + "; ".join(trust.reasons) if trust.reasons else "")
                + "): it gets no grants until `ctl uncordon`"
            )
        if kind == "uncordon" and node.attestation == "attested" and trust.trust != "trusted":
            raise ValidationError(
                f"node {node_id} is {trust.trust}: it needs a passing quote (`ctl attest --node "
                f"{node_id}`) before it can be uncordoned"
            )
        if kind == "attest":
            row = await self._attestation.request(node_id)
            if row is None:
                raise ValidationError(f"node {node_id} enrolled without a TPM: nothing to attest")
        else:
            if kind == "cordon":
                # Fail closed: no grant goes out from now on, whatever the node answers.
                await self._executor.call(self._store.commands.set_cordoned, node_id, True)
            row = await self._dispatcher.issue(node_id, kind, getattr(request, kind), ttl)
        final = await self._dispatcher.wait(row.command_id, timeout)
        return command_status(final or row)

    async def _cordon_result(self, row: CommandRow) -> None:
        """The node confirmed an uncordon: only then does the controller send it grants again.
        The node confirmed a new command key: sign its commands with that one from now on."""
        if row.kind == "uncordon" and row.state == CommandState.DONE:
            await self._executor.call(self._store.commands.set_cordoned, row.node_id, False)
        if row.kind == "announce_command_key" and row.state == CommandState.DONE:
            signed = link_pb2.SignedCommand.FromString(row.signed)
            announced = link_pb2.CommandEnvelope.FromString(signed.envelope).announce_command_key
            await self._executor.call(
                self._store.commands.set_command_key, row.node_id, announced.key_id
            )
            log.info("command_key_confirmed", node=row.node_id, key_id=announced.key_id)

    async def rotate_command_key(self) -> pb.RotateCommandKeyResponse:
        """A new command key, or the current one again to the nodes that have not confirmed
        it; each announcement is signed with the key its node pinned."""
        pinned = await self._executor.call(self._store.commands.command_keys)
        current = command_key_id(self._pki.command_key.public_key())
        previous_key = self._pki.previous_command_key
        previous = command_key_id(previous_key.public_key()) if previous_key else ""
        lagging = [node for node, key in pinned.items() if key and key != current]
        unreachable = [node for node in lagging if pinned[node] != previous]
        created = not lagging
        if created:
            await self._executor.call(self._pki.rotate_command_key)
            previous, current = current, command_key_id(self._pki.command_key.public_key())
            targets = list(pinned)
            log.warning("command_key_rotated", key_id=current, previous_key_id=previous)
        else:
            targets = [node for node in lagging if node not in unreachable]
        announcement = link_pb2.CommandKeyAnnouncement(
            public_key_pem=self._pki.command_public_pem.decode("ascii"), key_id=current
        )
        for node in targets:
            await self._dispatcher.issue(
                node, "announce_command_key", announcement, self._settings.command_ttl_s
            )
        return pb.RotateCommandKeyResponse(
            created=created, key_id=current, previous_key_id=previous, announced=targets,
            unreachable=unreachable,
        )  # fmt: skip

    async def list_commands(self, request: pb.ListCommandsRequest) -> pb.ListCommandsResponse:
        rows = await self._executor.call(
            self._store.commands.recent, request.node_id, request.limit or 100
        )
        return pb.ListCommandsResponse(commands=[command_status(r) for r in rows])

    async def set_policy(self, request: pb.SetPolicyRequest) -> pb.SetPolicyResponse:
        _check_group(request.group)
        try:
            Policy.from_json(request.policy_json)
        except AccelguardError as error:
            raise ValidationError(f"policy for group {request.group!r} refused: {error}") from None
        nodes = await self._executor.call(
            self._store.commands.set_policy, request.group, request.policy_json
        )
        log.info("policy_set", group=request.group, nodes=nodes)
        return pb.SetPolicyResponse(group=request.group, nodes=nodes)

    async def set_node_group(self, request: pb.SetNodeGroupRequest) -> pb.SetNodeGroupResponse:
        _check_group(request.group)
        await self._executor.call(self._store.commands.require_node, request.node_id)
        await self._executor.call(self._store.commands.set_group, request.node_id, request.group)
        log.info("node_group_set", node=request.node_id, group=request.group)
        return pb.SetNodeGroupResponse()


def _check_group(group: str) -> None:
    if not _GROUP.fullmatch(group):
        raise ValidationError(f"group {group[:80]!r}: 1-64 of A-Z a-z 0-9 . _ -")


_GROUP = re.compile(r"[A-Za-z0-9._-]{1,64}")


def command_status(row: CommandRow) -> pb.CommandStatus:
    status = pb.CommandStatus(
        command_id=row.command_id.hex(),
        node_id=row.node_id,
        kind=row.kind,
        state=row.state,
        issued_at=row.issued_at,
        not_after=row.not_after,
        delivered=row.delivered,
    )
    if row.result is not None:
        status.result.ParseFromString(row.result)
    if row.verdict:
        verdict = json.loads(row.verdict)
        status.verdict.CopyFrom(
            pb.AttestationVerdict(
                passed=bool(verdict["passed"]),
                reasons=[str(r) for r in verdict["reasons"]],
                verified_at=float(verdict["verified_at"]),
            )
        )
    return status


_STATUS = [
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
]


# The calls that change the fleet: root and the admin group only (the rest are reads).
CHANGING: Final = frozenset(
    {"CreateToken", "RunCommand", "SetPolicy", "SetNodeGroup", "RotateCommandKey"}
)


class _Servicer(pb_grpc.ControllerAdminServicer):  # type: ignore[misc]
    def __init__(
        self, handlers: ControllerAdminHandlers, gate: CallerGate, admin_gid: int | None
    ) -> None:
        self._handlers = handlers
        self._gate = gate
        self._admin_gid = admin_gid

    async def _guard(self, call: str, context: Any, work: Any) -> Any:
        caller = self._gate.caller(context.peer())
        changes = call in CHANGING
        try:
            authorize(
                call, caller, changes=changes, admin_gid=self._admin_gid,
                gate=self._gate.public, what="the fleet", group_key="admin_group",
            )  # fmt: skip
        except PermissionDeniedError as error:
            work.close()  # never started
            log.warning("controller_admin_call_refused", call=call, error=str(error))
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(error))
            raise
        if changes and caller is not None:
            log.info("controller_admin_call", call=call, uid=caller.uid, gid=caller.gid,
                     pid=caller.pid)  # fmt: skip
        try:
            return await work
        except AccelguardError as error:
            code = next((c for kind, c in _STATUS if isinstance(error, kind)), None)
            await context.abort(code or grpc.StatusCode.INTERNAL, str(error))
            raise

    async def CreateToken(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._guard("CreateToken", context, self._handlers.create_token(request))

    async def ListNodes(self, request: Any, context: Any) -> Any:  # noqa: N802, ARG002
        return await self._guard("ListNodes", context, self._handlers.list_nodes())

    async def GetNode(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._guard("GetNode", context, self._handlers.get_node(request))

    async def ListNodeCertificates(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._guard(
            "ListNodeCertificates", context, self._handlers.certificates(request)
        )

    async def ListAuditCheckpoints(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._guard(
            "ListAuditCheckpoints", context, self._handlers.audit_checkpoints(request)
        )

    async def GetStatus(self, request: Any, context: Any) -> Any:  # noqa: N802, ARG002
        return await self._guard("GetStatus", context, self._handlers.status())

    async def RunCommand(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._guard("RunCommand", context, self._handlers.run_command(request))

    async def ListCommands(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._guard("ListCommands", context, self._handlers.list_commands(request))

    async def SetPolicy(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._guard("SetPolicy", context, self._handlers.set_policy(request))

    async def SetNodeGroup(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._guard("SetNodeGroup", context, self._handlers.set_node_group(request))

    async def RotateCommandKey(self, request: Any, context: Any) -> Any:  # noqa: N802, ARG002
        return await self._guard("RotateCommandKey", context, self._handlers.rotate_command_key())


class ControllerAdminServer:
    def __init__(self, settings: ControllerSection, handlers: ControllerAdminHandlers) -> None:
        self._settings = settings
        self._handlers = handlers

    async def run(self) -> None:
        group = self._settings.admin_group
        try:
            admin_gid = grp.getgrnam(group).gr_gid if group else None
        except KeyError:
            raise AdminApiError(f"controller.admin_group: no group named {group!r}") from None
        gate = CallerGate(self._settings.admin_socket)
        server = grpc.aio.server()
        pb_grpc.add_ControllerAdminServicer_to_server(
            _Servicer(self._handlers, gate, admin_gid), server
        )
        await serve_on_unix_socket(
            server, self._settings.admin_socket, mode=self._settings.admin_socket_mode,
            group=self._settings.admin_read_group or group, what="controller admin socket",
            listening_event="controller_admin_listening", gate=gate,
        )  # fmt: skip
