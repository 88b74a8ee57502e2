"""Building blocks of the end-to-end tests: a booted swtpm, IMA lists, log surgery, the CLI.

A "booted" swtpm is one whose PCRs went through what a real machine's firmware and kernel did:
every extending event of a real firmware event log (tpm2-tools' GCE Ubuntu 21.04 log, whose
PCR 0 starts at zero: no StartupLocality or H-CRTM event, which swtpm could not reproduce from
locality 0), then an IMA measurement list into PCR 10 the way Linux >= 5.8 extends it.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from agent.attest.evidence import Evidence
from agent.attest.logs.eventlog import Event, EventLog, parse_event_log
from agent.attest.tpm.algorithms import BANKS
from agent.attest.tpm.client import TpmClient
from agent.attest.tpm.keys import AttestationKey
from agent.sim.swtpm import Swtpm

REPO = Path(__file__).resolve().parents[2]
TESTDATA = REPO.parent / "shared/testdata/eventlogs/tpm2-tools"
BOOT_LOG = "event-gce-ubuntu-2104-log.bin"
# Every PCR the GCE log measures, plus IMA's PCR 10, in every bank the log replays.
QUOTED_PCRS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 14]
SELECTION = {"sha1": QUOTED_PCRS, "sha256": QUOTED_PCRS, "sha384": QUOTED_PCRS}
SELECTION_TEXT = "+".join(f"{bank}:0-10,14" for bank in SELECTION)
AK_HANDLE = 0x81010002
# swtpm allocates these four banks; IMA extends every allocated bank.
TPM_BANKS = ("sha1", "sha256", "sha384", "sha512")
ACCELGUARD = [sys.executable, "-m", "agent.cli"]


def real_log(name: str = BOOT_LOG) -> bytes:
    return (TESTDATA / name).read_bytes()


# --- IMA ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """One IMA entry as the kernel builds it (security/integrity/ima): template fields as stored
    (strings with their NUL, ``d-ng`` as ``algo:`` NUL digest)."""

    template: str
    fields: tuple[bytes, ...]
    pcr: int = 10
    violation: bool = False

    def template_data(self) -> bytes:
        return b"".join(struct.pack("<I", len(field)) + field for field in self.fields)

    def template_hash(self) -> bytes:
        if self.violation:
            return bytes(20)
        return hashlib.sha1(self.template_data()).digest()  # noqa: S324 - IMA's template hash

    def extended(self, bank: str) -> bytes:
        """What ima_add_template_entry extends into ``bank`` (Linux >= 5.8)."""
        size = BANKS[bank].digest_size
        if self.violation:
            return b"\xff" * size
        return hashlib.new(bank, self.template_data()).digest()

    def binary(self, template_hash: bytes | None = None) -> bytes:
        name = self.template.encode()
        return (
            struct.pack("<I", self.pcr)
            + (template_hash if template_hash is not None else self.template_hash())
            + struct.pack("<I", len(name))
            + name
            + struct.pack("<I", len(self.template_data()))
            + self.template_data()
        )


def file_measurement(path: str, content: bytes, template: str = "ima-ng") -> Measurement:
    digest = b"sha256:\x00" + hashlib.sha256(content).digest()
    fields: tuple[bytes, ...] = (digest, path.encode() + b"\x00")
    if template == "ima-sig":
        fields += (b"\x03\x02\x04" + hashlib.sha256(path.encode()).digest()[:8],)
    return Measurement(template, fields)


def boot_measurements() -> list[Measurement]:
    return [
        Measurement("ima-ng", (b"sha256:\x00" + bytes(range(32)), b"boot_aggregate\x00")),
        file_measurement("/usr/lib/systemd/systemd", b"systemd"),
        file_measurement("/usr/bin/bash", b"bash"),
        file_measurement("/usr/lib/x86_64-linux-gnu/libc.so.6", b"libc", "ima-sig"),
        Measurement("ima-ng", (b"sha256:\x00" + bytes(32), b"/etc/shadow\x00"), violation=True),
        Measurement(
            "ima-buf",
            (b"sha256:\x00" + hashlib.sha256(b"6.8.0").digest(), b"kernel_version\x00", b"6.8.0"),
        ),
        file_measurement("/usr/bin/nvidia-smi", b"nvidia-smi"),
    ]


def ima_list(measurements: Sequence[Measurement]) -> bytes:
    return b"".join(m.binary() for m in measurements)


def extend_ima(client: TpmClient, measurements: Sequence[Measurement]) -> None:
    for measurement in measurements:
        client.extend_pcr(measurement.pcr, {bank: measurement.extended(bank) for bank in TPM_BANKS})


# --- firmware event log -------------------------------------------------------------------------


def extend_event_log(client: TpmClient, log: EventLog) -> None:
    """Replay the firmware's measurements into the TPM: one PCR_Extend per extending event."""
    for event in log.events:
        if event.extends:
            client.extend_pcr(
                event.pcr, {bank: event.digests[bank] for bank in log.replayable_banks}
            )


def serialize(log: EventLog, events: Sequence[Event] | None = None) -> bytes:
    """A crypto-agile log of ``events`` (default: the log's own) in PFP section 10 layout."""
    chosen = list(log.events if events is None else events)
    spec = chosen[0]
    out = struct.pack("<II", spec.pcr, spec.event_type) + spec.digests["sha1"]
    out += struct.pack("<I", len(spec.data)) + spec.data
    for event in chosen[1:]:
        out += struct.pack("<III", event.pcr, event.event_type, len(event.digests))
        for bank, digest in event.digests.items():
            out += struct.pack("<H", BANKS[bank].algorithm_id) + digest
        out += struct.pack("<I", len(event.data)) + event.data
    return out


def with_event_digest_changed(data: bytes, index: int) -> bytes:
    log = parse_event_log(data)
    events = list(log.events)
    target = events[index]
    changed = {bank: hashlib.new(bank, b"evil " + d).digest() for bank, d in target.digests.items()}
    events[index] = replace(target, digests=changed)
    return serialize(log, events)


def with_event_removed(data: bytes, index: int) -> bytes:
    log = parse_event_log(data)
    return serialize(log, [e for e in log.events if e.index != index])


# --- swtpm --------------------------------------------------------------------------------------


@dataclass
class BootedTpm:
    swtpm: Swtpm
    event_log: bytes
    measurements: list[Measurement]

    @property
    def tcti(self) -> str:
        return self.swtpm.tcti

    def client(self) -> TpmClient:
        return TpmClient(self.tcti)

    def boot(self) -> None:
        """Measure the firmware log and the IMA list into the (freshly reset) TPM."""
        with self.client() as client:
            extend_event_log(client, parse_event_log(self.event_log))
            extend_ima(client, self.measurements)

    def reset(self) -> None:
        """A TPM Reset (reboot): TPM_Init on the control channel, then TPM2_Startup(CLEAR)."""
        control = f"127.0.0.1:{self.swtpm.port + 1}"
        subprocess.run(["swtpm_ioctl", "--tcp", control, "-i"], check=True, timeout=30)
        subprocess.run(["tpm2_startup", "-c", "-T", self.tcti], check=True, timeout=30)


def start_booted_tpm(state_dir: Path) -> BootedTpm:
    swtpm = Swtpm(state_dir)
    swtpm.start()
    try:
        booted = BootedTpm(swtpm, real_log(), boot_measurements())
        booted.boot()
    except BaseException:
        swtpm.stop()
        raise
    return booted


def take_evidence(
    client: TpmClient,
    key: AttestationKey,
    booted: BootedTpm,
    nonce: bytes | None = None,
    selection: dict[str, list[int]] | None = None,
) -> Evidence:
    nonce = os.urandom(32) if nonce is None else nonce
    quote = client.quote(key, selection or SELECTION, nonce)
    return Evidence(
        ak_public=key.public,
        quote=quote.attest,
        signature=quote.signature,
        pcrs=quote.pcrs,
        nonce=nonce,
        event_log=booted.event_log,
        ima_log=ima_list(booted.measurements),
    )


# --- CLI ----------------------------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ACCELGUARD, *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO
    )


def write_config(path: Path, booted: BootedTpm, event_log: Path, ima_log: Path) -> Path:
    path.write_text(
        "[attest]\n"
        f'tcti = "{booted.tcti}"\n'
        f'event_log = "{event_log}"\n'
        f'ima_log = "{ima_log}"\n'
        f"ak_handle = {AK_HANDLE}\n"
        f'pcrs = "{SELECTION_TEXT}"\n'
    )
    return path
