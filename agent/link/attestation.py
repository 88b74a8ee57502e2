"""The node's answer to an attest command: a quote by the enrolled AK over the controller's
nonce, the firmware event log, and the IMA list from the entry the controller already holds.

The IMA position belongs to one boot: when the controller's boot id is not this boot's (a
reboot restarted the list), the whole list is shipped from entry 0 and the evidence names this
boot, so the verifier starts over instead of reading a restarted list as tampering.
"""

from __future__ import annotations

from pathlib import Path

from agent.config import AttestConfig
from agent.errors import AttestationError
from agent.link.service import boot_id
from agent.proto.accelguard.v1 import link_pb2 as pb
from agent.runtime.executor import BlockingExecutor


class TpmAttester:
    def __init__(self, settings: AttestConfig, executor: BlockingExecutor) -> None:
        self._settings = settings
        self._executor = executor

    async def attest(self, command: pb.AttestCommand) -> pb.AttestationEvidence:
        return await self._executor.call(self._collect, command)

    def _collect(self, command: pb.AttestCommand) -> pb.AttestationEvidence:
        # tpm2-pytss loads only here: a node without a TPM never needs it.
        from agent.attest.collect import read_event_log, read_ima_tail  # noqa: PLC0415
        from agent.attest.evidence import collect_evidence  # noqa: PLC0415
        from agent.attest.selection import check_selection, parse_pcr_selection  # noqa: PLC0415
        from agent.attest.tpm.client import TpmClient  # noqa: PLC0415

        settings = self._settings
        if command.selection:
            selection = {bank.bank: sorted(set(bank.pcrs)) for bank in command.selection}
            check_selection(selection, "attest command selection")
        else:
            selection = parse_pcr_selection(settings.pcrs, "config [attest] pcrs")
        this_boot = boot_id(settings.boot_id_file)
        first = command.ima_start_index if command.boot_id == this_boot else 0
        event_log = read_event_log(settings.event_log)
        ima_path: Path = settings.ima_log

        def read_ima() -> tuple[bytes, int] | None:
            if not ima_path.exists():
                return None
            return read_ima_tail(ima_path, first)

        with TpmClient(settings.tcti) as client:
            key = client.ensure_attestation_key(settings.ak_handle)
            evidence = collect_evidence(
                client, key, selection, bytes(command.nonce), event_log, read_ima
            )
        if evidence.nonce != bytes(command.nonce):  # pragma: no cover - collect_evidence's job
            raise AttestationError("the quote does not carry the controller's nonce")
        return pb.AttestationEvidence(
            ak_public=evidence.ak_public,
            quote=evidence.quote,
            signature=evidence.signature,
            pcrs=[
                pb.PcrBank(bank=bank, values=dict(values)) for bank, values in evidence.pcrs.items()
            ],
            nonce=evidence.nonce,
            event_log=evidence.event_log,
            ima_log=evidence.ima_log or b"",
            ima_start_index=evidence.ima_start_index,
            boot_id=this_boot,
        )
