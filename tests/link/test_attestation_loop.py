"""The controller's attestation judgement over real quotes: a booted swtpm, the agent's own
evidence collector (``TpmAttester``) and the controller's ``AttestationLoop.judge`` on a real
controller database. No processes or TLS here (tests/link/test_commands.py has those): this is
where the IMA position per boot, reboots, resent or skipped entries and a TPM state rolled back
are each checked on their own."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.attest.tpm.client import TpmClient
from agent.config import AttestConfig
from agent.controller.attestation import AttestationLoop, Verdict
from agent.controller.command_store import CommandRow, CommandState
from agent.controller.commands import CommandDispatcher
from agent.controller.config import ControllerSection
from agent.controller.store import NodeEnrollment, SqliteControllerStore
from agent.link.attestation import TpmAttester
from agent.link.envelope import CommandKey
from agent.proto.accelguard.v1 import link_pb2 as pb
from agent.runtime.executor import BlockingExecutor
from tests.attest_e2e.helpers import (
    AK_HANDLE,
    BootedTpm,
    Measurement,
    extend_ima,
    file_measurement,
    ima_list,
    start_booted_tpm,
)

NODE = "node-a"


@dataclass
class Rig:
    booted: BootedTpm
    root: Path
    store: SqliteControllerStore
    loop: AttestationLoop
    attester: TpmAttester
    executor: BlockingExecutor
    measurements: list[Measurement]
    config: AttestConfig

    @property
    def boot_file(self) -> Path:
        return self.root / "boot_id"

    def new_boot_id(self) -> str:
        value = str(uuid.uuid4())
        self.boot_file.write_text(value + "\n")
        return value

    def write_ima(self) -> None:
        (self.root / "ima.bin").write_bytes(ima_list(self.measurements))

    def measure(self, *paths: str) -> None:
        """Files measured by IMA while running: PCR 10 extended and the list appended."""
        new = [file_measurement(p, p.encode()) for p in paths]
        with self.booted.client() as client:
            extend_ima(client, new)
        self.measurements += new
        self.write_ima()

    def restart_tpm(self, state: Path | None = None) -> None:
        """Power the swtpm off and on (from ``state``, a copy of its state directory, if given);
        then the firmware and IMA measure a new boot into it."""
        swtpm = self.booted.swtpm
        swtpm.stop()
        if state is not None:
            shutil.rmtree(swtpm.state_dir)
            shutil.copytree(state, swtpm.state_dir)
        swtpm.start()  # on new ports
        self.attester = TpmAttester(replace(self.config, tcti=swtpm.tcti), self.executor)
        self.booted.boot()
        self.measurements = list(self.booted.measurements)
        self.write_ima()
        self.new_boot_id()

    def reboot(self) -> None:
        """A TPM reset and a new boot: fresh PCRs measured again, a new IMA list, a new id."""
        self.booted.reset()
        self.booted.boot()
        self.measurements = list(self.booted.measurements)
        self.write_ima()
        self.new_boot_id()

    def attest(self, *, start: int | None = None) -> tuple[Verdict, pb.AttestationEvidence]:
        """The controller's next attest command, answered by the agent's collector (optionally
        from another IMA entry than asked, as a misbehaving node would), judged."""

        async def exchange() -> tuple[Verdict, pb.AttestationEvidence]:
            row, evidence = await self.answered(start)
            return self.loop.judge(row), evidence

        return asyncio.run(exchange())

    async def answered(self, start: int | None = None) -> tuple[CommandRow, pb.AttestationEvidence]:
        """The controller's next attest command as its row with the node's answer."""
        node = self.store.node(NODE)
        assert node is not None
        trust = self.store.commands.trust(NODE)
        asked, boot = AttestationLoop._ima_position(node, trust)
        nonce = uuid.uuid4().bytes + uuid.uuid4().bytes
        command = pb.AttestCommand(
            nonce=nonce,
            selection=[pb.PcrSelection(bank="sha256", pcrs=[*range(11), 14])],
            ima_start_index=asked if start is None else start,
            boot_id=boot,
        )
        evidence = await self.attester.attest(command)
        context = {"nonce": nonce.hex(), "ima_start_index": asked, "boot_id": boot}
        row = CommandRow(
            command_id=uuid.uuid4().bytes, node_id=NODE, kind="attest",
            issued_at=time.time(), not_after=time.time() + 60, signed=b"",
            state=CommandState.DONE, delivered=True, finished_at=time.time(),
            result=pb.CommandResult(ok=True, attestation=evidence).SerializeToString(),
            context=json.dumps(context).encode(),
        )  # fmt: skip
        return row, evidence


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    booted = start_booted_tpm(tmp_path / "swtpm")
    executor = BlockingExecutor()
    store = SqliteControllerStore(tmp_path / "controller.db")
    try:
        with TpmClient(booted.tcti) as client:
            key = client.ensure_attestation_key(AK_HANDLE)
        store.complete_enrollment(
            None,
            NodeEnrollment(
                node_id=NODE, spiffe_id=f"spiffe://t/node/{NODE}", attestation="attested",
                ek_public=b"", ek_certificate=b"", ak_public=key.public, ak_name=key.name,
                scrub_key_pem="", cert_serial="1", cert_not_after=0.0, agent_version="test",
            ),
        )  # fmt: skip
        (tmp_path / "eventlog.bin").write_bytes(booted.event_log)
        settings = ControllerSection(attest_pcrs="sha256:0-10,14")
        signing = CommandKey(Ed25519PrivateKey.generate())
        dispatcher = CommandDispatcher(store, executor, lambda _pinned: signing)
        attest_config = AttestConfig(
            tcti=booted.tcti, event_log=tmp_path / "eventlog.bin", ima_log=tmp_path / "ima.bin",
            ak_handle=AK_HANDLE, pcrs="sha256:0-10,14", boot_id_file=tmp_path / "boot_id",
        )  # fmt: skip
        rig = Rig(
            booted, tmp_path, store, AttestationLoop(store, executor, dispatcher, settings),
            TpmAttester(attest_config, executor), executor, list(booted.measurements),
            attest_config,
        )  # fmt: skip
        rig.write_ima()
        rig.new_boot_id()
        yield rig
    finally:
        executor.shutdown()
        store.close()
        booted.swtpm.stop()


def _passed(verdict: Verdict) -> None:
    assert verdict.passed, verdict.reasons


def test_ima_is_shipped_incrementally_within_a_boot(rig: Rig) -> None:
    verdict, evidence = rig.attest()
    _passed(verdict)
    first = len(rig.measurements)
    assert evidence.ima_start_index == 0
    rig.measure("/usr/bin/python3", "/opt/job/train.py", "/opt/job/data.bin")
    verdict, evidence = rig.attest()
    _passed(verdict)
    assert evidence.ima_start_index == first
    assert evidence.ima_log == ima_list(rig.measurements[first:]), "not only the new entries"
    # Nothing new: an empty tail from the end of the list.
    verdict, evidence = rig.attest()
    _passed(verdict)
    assert (evidence.ima_start_index, evidence.ima_log) == (len(rig.measurements), b"")


def test_resent_or_skipped_entries_are_refused(rig: Rig) -> None:
    _passed(rig.attest()[0])
    first = len(rig.measurements)
    rig.measure("/usr/bin/a", "/usr/bin/b")
    verdict, _ = rig.attest(start=first - 2)
    assert not verdict.passed
    assert any("resent old entries" in r for r in verdict.reasons), verdict.reasons
    verdict, _ = rig.attest(start=first + 1)
    assert not verdict.passed
    assert any("skipped" in r for r in verdict.reasons), verdict.reasons
    assert rig.store.commands.trust(NODE).cordoned


def test_a_reboot_is_recognised_and_a_claimed_one_is_not(rig: Rig) -> None:
    _passed(rig.attest()[0])
    rig.measure("/usr/bin/before-reboot")
    _passed(rig.attest()[0])
    rig.reboot()
    verdict, evidence = rig.attest()
    _passed(verdict)
    assert evidence.ima_start_index == 0, "a new boot must ship its list from entry 0"
    # A new boot id without a TPM reset: the IMA list cannot have restarted.
    rig.new_boot_id()
    verdict, _ = rig.attest()
    assert not verdict.passed
    assert any("reset count" in r for r in verdict.reasons), verdict.reasons


def test_a_tpm_state_rolled_back_is_refused(rig: Rig) -> None:
    _passed(rig.attest()[0])
    # Keep a copy of the TPM as it is now (an operator's backup, a VM snapshot)...
    saved = rig.root / "swtpm-saved"
    rig.booted.swtpm.stop()
    shutil.copytree(rig.booted.swtpm.state_dir, saved)
    rig.restart_tpm()
    time.sleep(2)  # the TPM clock moves on
    _passed(rig.attest()[0])
    # ... and restore it: its clock and counters go back.
    rig.restart_tpm(saved)
    verdict, _ = rig.attest()
    assert not verdict.passed
    assert any(r.startswith("clock") for r in verdict.reasons), verdict.reasons


def test_a_result_reported_twice_is_judged_once(rig: Rig) -> None:
    """The first run's report and the node's stored answer to a re-delivery carry the same
    quote, and their hooks can run together: judged twice, the second would fail as a replay
    (clock not advanced) and cordon a healthy node."""

    async def twice() -> None:
        row, _ = await rig.answered()
        await rig.executor.call(rig.store.commands.add, row)
        await asyncio.gather(rig.loop.on_result(row), rig.loop.on_result(row))
        # And once more after the verdict, from a row read before it was stored.
        await rig.loop.on_result(row)
        stored = await rig.executor.call(rig.store.commands.get, row.command_id)
        assert stored is not None and json.loads(stored.verdict)["passed"], stored

    asyncio.run(twice())
    trust = rig.store.commands.trust(NODE)
    assert trust.trust == "trusted" and not trust.cordoned, trust
