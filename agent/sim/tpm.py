"""``accelguard sim tpm``: a TPM for the simulated node, to try attestation without hardware.

A real software TPM (swtpm, agent/sim/swtpm.py) is started on localhost and "booted" with a real
firmware event log: every event of the log that extends a PCR is extended into the TPM, bank by
bank, as the firmware did, so that a quote of it matches the log. The node's ``agent.toml`` is
pointed at it ([attest] ``tcti``, ``event_log``, ``ima_log``, ``pcrs``), and ``attest quote``,
``attest make-policy`` and ``attest verify`` then run as on a real node (docs/simulated-node.md).

What swtpm cannot reproduce is said, not hidden: a log that starts PCR 0 at locality 3 or 4
(a StartupLocality event, an H-CRTM) cannot be replayed from locality 0, so PCR 0 is left out of
the selection. The IMA list is empty (no kernel measured anything into this TPM), so PCR 10 is
its reset value and replays from an empty list.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.attest.logs.eventlog import EventLog, parse_event_log
from agent.attest.tpm.client import TpmClient
from agent.config import load_config, to_toml
from agent.errors import AccelguardError, ValidationError
from agent.runtime.files import publish_file
from agent.runtime.inputs import read_bounded
from agent.sim.swtpm import Swtpm

# A firmware log is tens of kilobytes; a few megabytes is already not one.
MAX_EVENT_LOG_BYTES: Final = 16 << 20
# The PCR the IMA list extends.
IMA_PCR: Final = 10


@dataclass
class SimTpm:
    swtpm: Swtpm
    event_log: Path
    ima_log: Path
    selection: str
    excluded: tuple[int, ...]

    @property
    def tcti(self) -> str:
        return self.swtpm.tcti

    def stop(self) -> None:
        self.swtpm.stop()


def selection_for(log: EventLog) -> tuple[str, tuple[int, ...]]:
    """A PCR selection the booted TPM can match: every PCR the log measures, plus IMA's, in
    every bank the log replays (swtpm allocates sha1, sha256, sha384 and sha512; a policy made
    from the log covers each of its banks); PCR 0 left out when the log starts it at a locality
    swtpm cannot boot from. Returns the selection and what it left out."""
    measured = {event.pcr for event in log.events if event.extends} | {IMA_PCR}
    excluded: tuple[int, ...] = ()
    if log.startup_locality:
        measured.discard(0)
        excluded = (0,)
    if not log.replayable_banks:
        raise ValidationError("the event log replays in no bank: nothing a TPM could match")
    pcrs = ",".join(str(index) for index in sorted(measured))
    return "+".join(f"{bank}:{pcrs}" for bank in log.replayable_banks), excluded


def start_sim_tpm(node_dir: Path, event_log: Path) -> SimTpm:
    """Start and boot a swtpm for the simulated node at ``node_dir``, point its config at it."""
    config_path = node_dir / "agent.toml"
    if not config_path.is_file():
        raise ValidationError(f"{node_dir}: no agent.toml there (make one with `sim init`)")
    config = load_config(config_path, required=True)
    data = read_bounded(event_log, MAX_EVENT_LOG_BYTES, "event log")
    try:
        log = parse_event_log(data)
    except AccelguardError as error:
        raise ValidationError(f"event log {event_log}: {error}") from None
    selection, excluded = selection_for(log)
    directory = node_dir / "tpm"
    directory.mkdir(mode=0o700, exist_ok=True)
    log_copy, ima_copy = directory / "binary_bios_measurements", directory / "ima_measurements"
    log_copy.write_bytes(data)
    ima_copy.write_bytes(b"")
    swtpm = Swtpm(directory / "state")
    swtpm.start()
    try:
        with TpmClient(swtpm.tcti) as client:
            for event in log.events:
                if event.extends:
                    digests = {bank: event.digests[bank] for bank in log.replayable_banks}
                    client.extend_pcr(event.pcr, digests)
        attest = dataclasses.replace(
            config.attest, tcti=swtpm.tcti, event_log=log_copy, ima_log=ima_copy, pcrs=selection
        )
        text = to_toml(dataclasses.replace(config, attest=attest)).encode()
        mode = config_path.stat().st_mode & 0o777
        publish_file(config_path, lambda stream: stream.write(text), mode=mode, replace=True)
    except BaseException:
        swtpm.stop()
        raise
    return SimTpm(swtpm, log_copy, ima_copy, selection, excluded)
