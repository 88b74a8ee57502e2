"""Separators in the OS-owned PCRs: Windows' WBCL in PCRs 12-14, and the firmware rule kept.

The TCG PFP separator rule (data 0x00000000, or 0x00000001 after an error) binds PCRs 0-7.
Windows' boot manager closes PCRs 12, 13 and 14 with an EV_SEPARATOR whose data is "WBCL".
No Windows log is among the shared test data, so the Windows log here is a real firmware log
(tpm2-tools' event-postcode.bin) followed by the kind of events Windows appends: EV_EVENT_TAG
(SIPA) blobs in PCRs 12-14, each PCR closed by a WBCL separator.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given

from agent.attest.evidence import Evidence
from agent.attest.logs.eventlog import EventLog, parse_event_log
from agent.attest.policy import evaluate, make_policy
from agent.attest.tpm.algorithms import BANKS, initial_pcr_value
from agent.attest.tpm.wire import compute_name
from agent.attest.verify.engine import verify_evidence
from agent.bench.attest import software_quote
from agent.errors import EventLogError
from tests.attest_e2e.helpers import run_cli
from tests.attest_logs.test_eventlog import (
    EV_SEPARATOR,
    fold,
    measured,
    pcr_event2,
    real_log,
)
from tests.fuzzing import MUTATIONS, fuzz, mutate

FIRMWARE_LOG = "event-postcode.bin"  # sha1 + sha256, PCRs 0-9
BANK_NAMES = ["sha1", "sha256"]
EV_EVENT_TAG = 0x00000006
WBCL = b"WBCL"


def windows_tail(
    separators: dict[int, bytes] | None = None,
) -> tuple[bytes, dict[int, list[bytes]]]:
    """Events Windows appends (a tagged blob per PCR, then its separator), and per PCR the
    data of each extend in order, for an independent replay."""
    separators = {12: WBCL, 13: WBCL, 14: WBCL} if separators is None else separators
    events = b""
    extended: dict[int, list[bytes]] = {}
    for pcr in sorted({12, 13, 14} | set(separators)):
        if pcr in (12, 13, 14):
            # TCG_PCClientTaggedEvent: a SIPA tag and a payload (contents do not matter here).
            blob = (0x40010 + pcr).to_bytes(4, "little") + (8).to_bytes(4, "little") + bytes(8)
            events += measured(pcr, EV_EVENT_TAG, blob, BANK_NAMES)
            extended.setdefault(pcr, []).append(blob)
        if pcr in separators:
            events += measured(pcr, EV_SEPARATOR, separators[pcr], BANK_NAMES)
            extended.setdefault(pcr, []).append(separators[pcr])
    return events, extended


def windows_log(separators: dict[int, bytes] | None = None) -> bytes:
    return real_log(FIRMWARE_LOG) + windows_tail(separators)[0]


def kinds(log: EventLog) -> list[tuple[str, str, int | None]]:
    return [(f.severity, f.kind, f.pcr) for f in log.findings]


# --- Parsing and replay ---


def test_wbcl_separators_in_pcrs_12_to_14_parse_and_replay() -> None:
    data = windows_log()
    log = parse_event_log(data)
    assert kinds(log) == [("info", "separator-wbcl", pcr) for pcr in (12, 13, 14)]
    assert all("'WBCL'" in f.message for f in log.findings)
    firmware = parse_event_log(real_log(FIRMWARE_LOG)).replay()
    _, extended = windows_tail()
    replayed = log.replay()
    for bank in BANK_NAMES:
        for pcr, values in extended.items():
            digests = [hashlib.new(bank, value).digest() for value in values]
            assert replayed[bank][pcr] == fold(bank, bytes(BANKS[bank].digest_size), digests)
        # The firmware PCRs replay exactly as without the Windows events.
        assert {p: v for p, v in replayed[bank].items() if p < 12} == firmware[bank]


@pytest.mark.parametrize("pcr", [0, 4, 7])
def test_wbcl_in_a_firmware_pcr_is_refused(pcr: int) -> None:
    data = windows_log() + measured(pcr, EV_SEPARATOR, WBCL, BANK_NAMES)
    log = parse_event_log(data)
    errors = [f for f in log.findings if f.severity == "error"]
    (finding,) = errors
    assert (finding.kind, finding.pcr, finding.event_index) == (
        "separator-value",
        pcr,
        len(log.events) - 1,
    )
    assert f"separator data 'WBCL' in firmware PCR {pcr}" in finding.message
    assert "allows only 0x00000000 (0x00000001 after an error) in PCRs 0-7" in finding.message
    assert "WBCL is the Windows separator of PCRs 12-14" in finding.message


@pytest.mark.parametrize(
    ("pcr", "data", "shown"),
    [(3, b"\x02\x00\x00\x00", "02000000"), (6, b"OS!!", "'OS!!'"), (0, b"\x00" * 8, "0000")],
)
def test_any_other_separator_data_in_a_firmware_pcr_is_refused(
    pcr: int, data: bytes, shown: str
) -> None:
    log = parse_event_log(real_log(FIRMWARE_LOG) + measured(pcr, EV_SEPARATOR, data, BANK_NAMES))
    errors = [f for f in log.findings if f.severity == "error"]
    assert [(f.kind, f.pcr) for f in errors] == [("separator-value", pcr)]
    assert f"separator data {shown}" in errors[0].message


@pytest.mark.parametrize(
    ("pcr", "data"),
    [(9, WBCL), (12, b"ABCD"), (13, b"\x02\x00\x00\x00"), (15, b"WBCL\x00"), (23, b"")],
)
def test_other_separators_in_os_pcrs_are_warnings(pcr: int, data: bytes) -> None:
    log = parse_event_log(real_log(FIRMWARE_LOG) + measured(pcr, EV_SEPARATOR, data, BANK_NAMES))
    assert kinds(log) == [("warning", "separator-os-value", pcr)]
    assert f"in OS PCR {pcr} follows no convention" in log.findings[0].message


@pytest.mark.parametrize("pcr", [4, 13])
def test_error_separators_are_errors_in_every_pcr(pcr: int) -> None:
    log = parse_event_log(windows_log({pcr: b"\x01\x00\x00\x00"}))
    assert ("error", "separator-error", pcr) in kinds(log)


def test_a_repeated_separator_is_a_warning() -> None:
    data = windows_log() + measured(12, EV_SEPARATOR, WBCL, BANK_NAMES)
    assert kinds(parse_event_log(data))[-2:] == [
        ("info", "separator-wbcl", 12),
        ("warning", "separator-repeated", 12),
    ]


def test_a_wbcl_separator_must_hash_to_its_data() -> None:
    wrong = {bank: hashlib.new(bank, b"WBCX").digest() for bank in BANK_NAMES}
    data = windows_log({12: WBCL, 13: WBCL}) + pcr_event2(14, EV_SEPARATOR, wrong, WBCL)
    errors = [f for f in parse_event_log(data).findings if f.severity == "error"]
    assert [(f.kind, f.pcr) for f in errors] == [("separator-digest", 14)] * 2


def test_to_dict_shows_the_separator_text() -> None:
    events = parse_event_log(windows_log()).to_dict()["events"]
    assert isinstance(events, list)
    separators = [e for e in events if e["type"] == "EV_SEPARATOR" and e["pcr"] >= 12]
    assert [e["decoded"] for e in separators] == [{"value": "0x4C434257", "text": "WBCL"}] * 3


def test_a_policy_made_from_a_windows_log_passes_it() -> None:
    log = parse_event_log(windows_log())
    policy = make_policy(log)
    assert evaluate(policy, log.replay(), log) == []
    assert policy.separator_pcrs == frozenset(range(8))
    assert "EV_SEPARATOR" in policy.reference_events[12]


# --- The verifier and the CLI ---


def evidence_for(data: bytes) -> tuple[Evidence, bytes]:
    """A software-signed quote over sha256:0-23 of the PCRs ``data`` replays to."""
    replayed = parse_event_log(data).replay()["sha256"]
    values = {pcr: replayed.get(pcr, initial_pcr_value(BANKS["sha256"], pcr)) for pcr in range(24)}
    nonce = os.urandom(16)
    key = ec.generate_private_key(ec.SECP256R1())
    ak_public, attest, signature, pcrs = software_quote(key, nonce, values)
    return Evidence(ak_public, attest, signature, pcrs, nonce, data), nonce


def test_the_verifier_accepts_wbcl_and_refuses_it_in_pcr_4() -> None:
    evidence, nonce = evidence_for(windows_log())
    report = verify_evidence(
        evidence, nonce, None, None, enrolled_ak_name=compute_name(evidence.ak_public)
    )
    assert report.ok, report.failures
    assert report.checks["event_log"] == "passed"
    bad, nonce = evidence_for(windows_log() + measured(4, EV_SEPARATOR, WBCL, BANK_NAMES))
    report = verify_evidence(bad, nonce, None, None)
    assert [(f.check, f.reason, f.pcr) for f in report.failures] == [
        ("event_log", "eventlog_error", 4)
    ]
    assert "separator data 'WBCL' in firmware PCR 4" in report.failures[0].message


def test_the_cli_accepts_wbcl_and_refuses_it_in_pcr_4(tmp_path: Path) -> None:
    log_path = tmp_path / "windows.bin"
    log_path.write_bytes(windows_log())
    shown = run_cli("attest", "eventlog", str(log_path))
    assert shown.returncode == 0, shown.stderr
    assert "info: separator-wbcl: event" in shown.stdout
    assert "error:" not in shown.stdout
    printed = json.loads(run_cli("attest", "eventlog", str(log_path), "--json").stdout)
    assert [f["kind"] for f in printed["findings"]] == ["separator-wbcl"] * 3

    refused = windows_log() + measured(4, EV_SEPARATOR, WBCL, BANK_NAMES)
    for data, code in ((windows_log(), 0), (refused, 1)):
        evidence, nonce = evidence_for(data)
        path = tmp_path / "evidence.json"
        path.write_text(evidence.to_json())
        result = run_cli("attest", "verify", str(path), "--nonce", nonce.hex())
        assert result.returncode == code, result.stdout + result.stderr
        if code:
            assert (
                "FAILED event_log: eventlog_error: event log separator-value: event "
                in result.stdout
            )
            assert "separator data 'WBCL' in firmware PCR 4" in result.stdout
        else:
            assert "result: PASS" in result.stdout


# --- Hostile input: only EventLogError, whatever the bytes ---

_WINDOWS = windows_log()


@fuzz(300)
@given(MUTATIONS)
def test_fuzz_mutated_windows_log(mutations: list[tuple[str, int, int]]) -> None:
    try:
        log = parse_event_log(mutate(_WINDOWS, mutations))
    except EventLogError as error:
        assert str(error).startswith("offset "), str(error)
        return
    log.replay()
    json.dumps(log.to_dict())


@fuzz(200)
@given(MUTATIONS)
def test_fuzz_mutated_separator_data(mutations: list[tuple[str, int, int]]) -> None:
    # Whatever a separator carries, the log parses and the findings judge the data: outside
    # PCRs 0-7 only the error values are errors; inside, anything but 0x00000000 is one.
    data = mutate(WBCL + bytes(4), mutations)[:64]
    errors = {b"\x01\x00\x00\x00", b"\xff\xff\xff\xff"}
    for pcr in (4, 12, 20):
        log = parse_event_log(_WINDOWS + measured(pcr, EV_SEPARATOR, data, BANK_NAMES))
        last = len(log.events) - 1
        severities = {f.severity for f in log.findings if f.event_index == last}
        if pcr == 4:
            assert ("error" in severities) == (data != bytes(4))
        else:
            assert ("error" in severities) == (data in errors)
