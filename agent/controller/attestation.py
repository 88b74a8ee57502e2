"""Attestation in the loop (docs/commands.md): the controller asks every attested node for a
fresh quote on each connect, every ``attest_interval_s`` and on ``ctl attest``, and judges the
evidence with agent/attest against what it enrolled and remembers:

* the enrolled AK (its Name), the nonce it sent and the PCRs it asked for;
* the AK's last accepted clock, reset and restart counters (a restored older TPM state rolls
  them back and is refused);
* the IMA position per boot: the node ships only entries from the position the controller
  asked for. A node that sends from elsewhere in the same boot (old entries again, or a gap)
  is refused with its reason; a new boot is recognised by a new boot id together with a new
  TPM reset count, and replayed from entry 0;
* the policy of the node's group (``ctl policy set``), an ``attest make-policy`` document.

A failed verification makes the node ``untrusted`` with the reasons and cordons it (the
controller sends it a cordon command and no grants). A passing one makes it ``trusted``; only
``ctl uncordon`` lifts the cordon, and only while the node is trusted.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from typing import Final

import structlog

from agent.attest.evidence import Evidence
from agent.attest.policy import Policy
from agent.attest.selection import parse_pcr_selection
from agent.attest.verify.engine import verify_evidence
from agent.attest.verify.state import VerifierState
from agent.controller.command_store import CommandRow, TrustRecord
from agent.controller.commands import CommandDispatcher
from agent.controller.config import ControllerSection
from agent.controller.store import ControllerStore, NodeRecord
from agent.errors import AccelguardError
from agent.proto.accelguard.v1 import link_pb2 as pb
from agent.runtime.executor import BlockingExecutor

log = structlog.get_logger(__name__)

NONCE_BYTES: Final = 32
POLL_S: Final = 1.0
# An attest command lives this long: a node that cannot quote in time is asked again.
ATTEST_TTL_S: Final = 120.0


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: tuple[str, ...]
    verified_at: float

    def to_json(self) -> str:
        return json.dumps(
            {"passed": self.passed, "reasons": list(self.reasons), "verified_at": self.verified_at}
        )


class AttestationLoop:
    def __init__(
        self,
        store: ControllerStore,
        executor: BlockingExecutor,
        dispatcher: CommandDispatcher,
        settings: ControllerSection,
    ) -> None:
        self._store = store
        self._executor = executor
        self._dispatcher = dispatcher
        self._settings = settings
        self._selection = parse_pcr_selection(settings.attest_pcrs, "controller attest_pcrs")
        self._next_due: dict[str, float] = {}
        # node -> (attest command id, when it was issued)
        self._in_flight: dict[str, tuple[bytes, float]] = {}
        self._policies: dict[str, tuple[str, Policy]] = {}
        # Attest commands whose evidence is being judged (see on_result).
        self._judging: set[bytes] = set()
        dispatcher.result_hooks.append(self.on_result)

    def node_connected(self, node_id: str) -> None:
        """Attest on every connect: whatever happened while the node was away."""
        self._next_due[node_id] = 0.0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            now = time.time()
            for node_id, (command_id, issued) in list(self._in_flight.items()):
                if now - issued > ATTEST_TTL_S + 2 * POLL_S:
                    # Connected, asked, and no evidence before the command expired: that is a
                    # failed attestation, not a pass by default.
                    del self._in_flight[node_id]
                    await self._fail_silent(node_id, command_id)
            for node_id, due in list(self._next_due.items()):
                if due > now or node_id in self._in_flight:
                    continue
                if not self._dispatcher.connected(node_id):
                    continue
                try:
                    await self.request(node_id)
                except AccelguardError as error:
                    log.warning("attest_request_failed", node=node_id, error=str(error))
                    self._next_due[node_id] = now + self._settings.attest_interval_s

    async def request(self, node_id: str) -> CommandRow | None:
        """Send ``node_id`` an attest command with a fresh nonce (None: an unattested node)."""
        node = await self._executor.call(self._store.node, node_id)
        if node is None:
            return None
        if node.attestation != "attested":
            await self._executor.call(self._store.commands.set_unattested, node_id)
            self._next_due.pop(node_id, None)
            return None
        trust = await self._executor.call(self._store.commands.trust, node_id)
        start, boot = self._ima_position(node, trust)
        selection = await self._executor.call(self._selection_for, trust.group)
        nonce = os.urandom(NONCE_BYTES)
        command = pb.AttestCommand(
            nonce=nonce,
            selection=[pb.PcrSelection(bank=b, pcrs=p) for b, p in selection.items()],
            ima_start_index=start,
            boot_id=boot,
        )
        context = json.dumps(
            {"nonce": nonce.hex(), "ima_start_index": start, "boot_id": boot,
             "selection": selection}
        ).encode()  # fmt: skip
        row = await self._dispatcher.issue(node_id, "attest", command, ATTEST_TTL_S, context)
        self._in_flight[node_id] = (row.command_id, time.time())
        self._next_due[node_id] = time.time() + self._settings.attest_interval_s
        return row

    def _selection_for(self, group: str) -> dict[str, list[int]]:
        """``attest_pcrs`` and every bank and PCR the group's policy judges: a policy is never
        left without the values it needs (executor thread)."""
        wanted = {bank: set(pcrs) for bank, pcrs in self._selection.items()}
        policy = self._policy(self._store, group, [])
        if policy is not None:
            for bank, values in policy.golden_pcrs.items():
                wanted.setdefault(bank, set()).update(values)
            for pcr, by_type in policy.reference_events.items():
                for by_bank in by_type.values():
                    for bank in by_bank:
                        wanted.setdefault(bank, set()).add(pcr)
        return {bank: sorted(pcrs) for bank, pcrs in sorted(wanted.items())}

    @staticmethod
    def _ima_position(node: NodeRecord, trust: TrustRecord) -> tuple[int, str]:
        if not trust.verifier_state or not trust.ima_boot_id:
            return 0, ""
        state = VerifierState.from_json(trust.verifier_state, f"node {node.node_id}")
        progress = state.ima_progress(node.ak_name)
        if progress is None:
            return 0, ""
        return progress.next_index, trust.ima_boot_id

    async def on_result(self, row: CommandRow) -> None:
        """Judge an attest command's evidence, once. A command's result can be reported twice
        (the first run's report, and the node's stored answer to a re-delivery), and the two
        hooks may run together: judging the same quote twice fails the second time, as a
        replayed quote (its clock has not advanced), and would cordon a healthy node."""
        if row.kind != "attest" or row.result is None or row.verdict:
            return
        if row.command_id in self._judging:
            return
        self._judging.add(row.command_id)
        try:
            # Read again behind the guard: a judgement that ended since ``row`` was read has
            # stored its verdict.
            current = await self._executor.call(self._store.commands.get, row.command_id)
            if current is None or current.verdict:
                return
            if self._in_flight.get(row.node_id, (b"", 0.0))[0] == row.command_id:
                del self._in_flight[row.node_id]
            verdict = await self._executor.call(self.judge, current)
            await self._conclude(row.node_id, row.command_id, verdict)
        finally:
            self._judging.discard(row.command_id)

    async def _fail_silent(self, node_id: str, command_id: bytes) -> None:
        row = await self._executor.call(self._store.commands.get, command_id)
        if row is None or row.result is not None:
            return
        reasons = (f"no evidence: the node did not answer attest command {command_id.hex()} "
                   f"within {ATTEST_TTL_S:.0f} s",)  # fmt: skip
        await self._executor.call(
            self._store.commands.record_verdict, node_id, False, list(reasons), None, ""
        )
        await self._conclude(node_id, command_id, Verdict(False, reasons, time.time()))

    async def _conclude(self, node_id: str, command_id: bytes, verdict: Verdict) -> None:
        await self._executor.call(self._store.commands.set_verdict, command_id, verdict.to_json())
        if verdict.passed:
            log.info("node_attested", node=node_id)
            return
        log.warning("node_untrusted", node=node_id, reasons=list(verdict.reasons))
        # Cordon it at the node too: it then refuses remote grants itself.
        await self._dispatcher.issue(
            node_id,
            "cordon",
            pb.CordonCommand(reason="attestation failed: " + "; ".join(verdict.reasons)[:1000]),
            self._settings.command_ttl_s,
        )

    def judge(self, row: CommandRow) -> Verdict:
        """Verify the evidence in ``row``'s result and record the verdict (executor thread)."""
        store = self._store
        reasons, kept = self._verify(row, store)
        passed = not reasons
        state_json, boot = kept if kept is not None else (None, "")
        store.commands.record_verdict(row.node_id, passed, reasons, state_json, boot)
        return Verdict(passed, tuple(reasons), time.time())

    def _verify(
        self, row: CommandRow, store: ControllerStore
    ) -> tuple[list[str], tuple[bytes, str] | None]:
        """The reasons the evidence fails (none: it passed), and the verifier state to keep
        with the boot id its IMA position belongs to."""
        result = pb.CommandResult.FromString(row.result or b"")
        if not result.ok or result.WhichOneof("result") != "attestation":
            return [f"no evidence: {result.error or 'the node sent no attestation'}"], None
        node = store.node(row.node_id)
        if node is None:
            return ["node is no longer enrolled"], None
        trust = store.commands.trust(row.node_id)
        context = json.loads(row.context)
        asked_start, asked_boot = int(context["ima_start_index"]), str(context["boot_id"])
        message = result.attestation
        evidence = Evidence(
            ak_public=bytes(message.ak_public),
            quote=bytes(message.quote),
            signature=bytes(message.signature),
            pcrs={bank.bank: dict(bank.values) for bank in message.pcrs},
            nonce=bytes(message.nonce),
            event_log=bytes(message.event_log),
            ima_log=bytes(message.ima_log) if message.ima_log or message.ima_start_index else None,
            ima_start_index=message.ima_start_index,
        )
        state = (
            VerifierState.from_json(trust.verifier_state, f"node {node.node_id}")
            if trust.verifier_state
            else VerifierState()
        )
        previous = state.clock_state(node.ak_name)
        progress = state.ima_progress(node.ak_name)
        reasons: list[str] = []
        same_boot = bool(asked_boot) and message.boot_id == asked_boot
        if evidence.ima_log is not None:
            if same_boot and message.ima_start_index != asked_start:
                what = "resent old entries" if message.ima_start_index < asked_start else "skipped"
                reasons.append(
                    f"ima_position: asked for IMA entries from {asked_start} of boot "
                    f"{asked_boot}, the node {what} (sent from {message.ima_start_index})"
                )
            if not same_boot and message.ima_start_index != 0:
                reasons.append(
                    f"ima_position: a new boot ({message.boot_id[:64]!r}) must ship its IMA list "
                    f"from entry 0, not {message.ima_start_index}"
                )
        if not same_boot:
            progress = None  # a new boot replays from entry 0
        policy = self._policy(store, trust.group, reasons)
        report = verify_evidence(
            evidence,
            bytes.fromhex(context["nonce"]),
            policy,
            previous,
            context.get("selection") or self._selection,
            enrolled_ak_name=node.ak_name,
            ima_progress=progress,
        )
        reasons.extend(f"{f.check}: {f.reason}: {f.message}" for f in report.failures)
        if (
            not same_boot
            and asked_boot
            and previous is not None
            and report.clock_state is not None
            and report.clock_state.reset_count == previous.reset_count
        ):
            reasons.append(
                f"boot: the node reports a new boot id but its TPM reset count is still "
                f"{previous.reset_count}: the IMA list cannot have restarted"
            )
        if not reasons and state.record(report):
            return reasons, (json.dumps(state.to_dict()).encode(), message.boot_id)
        return reasons, None

    def _policy(self, store: ControllerStore, group: str, reasons: list[str]) -> Policy | None:
        document = store.commands.policy(group)
        if document is None:
            return None
        # Parsed once per document: the same Policy object lets the verifier reuse its verdict
        # on a boot it has judged before (agent/attest/policy.py).
        cached = self._policies.get(group)
        if cached is not None and cached[0] == document:
            return cached[1]
        try:
            policy = Policy.from_json(document)
        except AccelguardError as error:
            reasons.append(f"policy: the policy of group {group!r} is unusable: {error}")
            return None
        self._policies[group] = (document, policy)
        return policy
