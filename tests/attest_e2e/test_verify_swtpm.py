"""verify_evidence against a real swtpm whose PCRs hold a real firmware log and an IMA list.

The genuine evidence passes every check that can run; each tampering then fails with its own
reason and with nothing else, so a verifier's report points at what was changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path

import pytest

from agent.attest.evidence import Evidence, parse_evidence
from agent.attest.logs.eventlog import parse_event_log
from agent.attest.logs.ima import parse_ima_binary
from agent.attest.policy import make_policy
from agent.attest.tpm.client import TpmClient
from agent.attest.tpm.keys import AkAlgorithm, AttestationKey
from agent.attest.tpm.wire import decode_attest
from agent.attest.verify.engine import verify_evidence
from agent.attest.verify.report import Check, VerificationReport
from agent.attest.verify.state import load_state, open_state
from tests.attest_e2e.helpers import (
    AK_HANDLE,
    SELECTION,
    BootedTpm,
    extend_ima,
    file_measurement,
    ima_list,
    real_log,
    take_evidence,
    with_event_digest_changed,
    with_event_removed,
)

SHIM_EVENT = 23  # PCR 4, EV_EFI_BOOT_SERVICES_APPLICATION
BOOT_VARIABLE_EVENT = 12  # PCR 1, EV_EFI_VARIABLE_BOOT


@pytest.fixture(scope="module")
def genuine(tpm: TpmClient, ak: AttestationKey, booted: BootedTpm) -> Evidence:
    return take_evidence(tpm, ak, booted)


def check(
    evidence: Evidence,
    nonce: bytes | None = None,
    *,
    use_nonce: bool = True,
    **options: object,
) -> VerificationReport:
    """verify_evidence as the controller calls it: its own nonce, the selection it asked for."""
    arguments: dict[str, object] = {
        "expected_selection": SELECTION,
        "enrolled_ak_name": None,
        "policy": None,
        "previous": None,
    }
    arguments.update(options)
    expected = (evidence.nonce if nonce is None else nonce) if use_nonce else None
    return verify_evidence(evidence, expected, **arguments)  # type: ignore[arg-type]


def failures_of(report: VerificationReport) -> list[tuple[str, int | None, str | None]]:
    return [(failure.reason, failure.pcr, failure.bank) for failure in report.failures]


def test_genuine_evidence_passes_every_check(genuine: Evidence, ak: AttestationKey) -> None:
    report = check(genuine, enrolled_ak_name=ak.name)
    assert report.ok, report.failures
    assert report.checks == {
        Check.EVIDENCE: "passed",
        Check.AK_IDENTITY: "passed",
        Check.QUOTE: "passed",
        Check.FRESHNESS: "passed",
        Check.PCR_SELECTION: "passed",
        Check.CLOCK: "not_checked",
        Check.EVENT_LOG: "passed",
        Check.IMA: "passed",
        Check.POLICY: "not_checked",
    }
    assert {item.reason for item in report.unchecked} == {"clock_not_checked", "policy_not_checked"}
    assert report.ima_progress is not None
    assert report.ima_progress.next_index == len(ima_list_entries(genuine))
    assert report.clock_state is not None and report.clock_state.ak_name == ak.name
    # The document survives its JSON form.
    assert parse_evidence(genuine.to_json()) == genuine


def ima_list_entries(evidence: Evidence) -> list[int]:
    assert evidence.ima_log is not None
    return [entry.index for entry in parse_ima_binary(evidence.ima_log).entries]


def test_without_a_nonce_everything_but_freshness_is_checked(genuine: Evidence) -> None:
    report = check(genuine, use_nonce=False)
    assert report.ok
    assert report.checks[Check.FRESHNESS] == "not_checked"
    assert report.checks[Check.EVENT_LOG] == report.checks[Check.IMA] == "passed"
    freshness = [item for item in report.unchecked if item.check == Check.FRESHNESS]
    assert [item.reason for item in freshness] == ["freshness_not_checked"]
    assert "freshness not checked" in freshness[0].message


def test_one_event_digest_changed(genuine: Evidence) -> None:
    tampered = dataclasses.replace(
        genuine, event_log=with_event_digest_changed(genuine.event_log, SHIM_EVENT)
    )
    report = check(tampered)
    assert report.reasons == {"eventlog_pcr_mismatch"}
    assert sorted(failures_of(report)) == [
        ("eventlog_pcr_mismatch", 4, bank) for bank in ("sha1", "sha256", "sha384")
    ]
    message = report.failures[0].message
    assert "PCR 4" in message and "event log replays to" in message


def test_one_event_removed(genuine: Evidence) -> None:
    tampered = dataclasses.replace(
        genuine, event_log=with_event_removed(genuine.event_log, BOOT_VARIABLE_EVENT)
    )
    report = check(tampered)
    assert report.reasons == {"eventlog_pcr_mismatch"}
    assert {failure.pcr for failure in report.failures} == {1}


def test_wrong_nonce(genuine: Evidence) -> None:
    report = check(genuine, os.urandom(32))
    assert report.reasons == {"nonce_mismatch"}
    assert report.checks[Check.FRESHNESS] == "failed"


def test_replayed_quote(genuine: Evidence, tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    with open_state(state_file) as state:
        first = check(genuine, previous=state.clock_state(None))
        assert first.ok
        assert state.record(first)
    assert state_file.stat().st_mode & 0o777 == 0o600
    name = first.ak_name
    with open_state(state_file) as state:
        replayed = check(
            genuine, previous=state.clock_state(name), ima_progress=state.ima_progress(name)
        )
        assert not state.record(replayed)
    assert replayed.reasons == {"clock_not_advanced"}
    assert replayed.checks[Check.CLOCK] == "failed"


def test_a_later_quote_passes_against_the_kept_state(
    tpm: TpmClient, ak: AttestationKey, booted: BootedTpm, genuine: Evidence
) -> None:
    first = check(genuine)
    time.sleep(0.01)  # TPM Clock counts milliseconds; this waits, it asserts no time
    later = check(take_evidence(tpm, ak, booted), previous=first.clock_state)
    assert later.ok, later.failures
    assert later.checks[Check.CLOCK] == "passed"


def test_pcr_selection_narrowed(tpm: TpmClient, ak: AttestationKey, booted: BootedTpm) -> None:
    narrowed = take_evidence(tpm, ak, booted, selection={"sha256": list(range(8))})
    report = check(narrowed)
    assert report.reasons == {"pcr_selection_mismatch"}
    # What the narrowed quote leaves unattested is said, not passed over.
    unchecked = {(item.reason, item.pcr) for item in report.unchecked}
    assert {("eventlog_pcr_not_quoted", 8), ("eventlog_pcr_not_quoted", 14)} <= unchecked
    assert ("ima_not_checked", 10) in unchecked


def test_signature_from_another_key(tpm: TpmClient, ak: AttestationKey, booted: BootedTpm) -> None:
    nonce = os.urandom(32)
    genuine = take_evidence(tpm, ak, booted, nonce)
    other = tpm.create_attestation_key(AkAlgorithm.ECC_P256)
    try:
        foreign = tpm.quote(other, SELECTION, nonce)
    finally:
        tpm.flush_attestation_key(other)
    report = check(dataclasses.replace(genuine, signature=foreign.signature))
    assert report.reasons == {"signature_invalid"}
    # The other AK's own, self-consistent evidence is refused for not being the enrolled AK.
    substituted = dataclasses.replace(
        genuine, ak_public=other.public, quote=foreign.attest, signature=foreign.signature
    )
    report = check(substituted, enrolled_ak_name=ak.name)
    assert report.reasons == {"ak_not_enrolled"}


def test_ima_entry_edited(genuine: Evidence, booted: BootedTpm) -> None:
    measurements = list(booted.measurements)
    # An attacker hides a changed binary: new file digest, template hash recomputed to match.
    measurements[2] = file_measurement("/usr/bin/bash", b"bash with a backdoor")
    report = check(dataclasses.replace(genuine, ima_log=ima_list(measurements)))
    assert report.reasons == {"ima_pcr_mismatch"}
    assert {(f.pcr, f.bank) for f in report.failures} == {
        (10, "sha1"),
        (10, "sha256"),
        (10, "sha384"),
    }
    # Edited without fixing the template hash: that entry is named, SHA-1 still replays (the
    # list's hashes are what SHA-1 folds), the other banks recompute and differ.
    original = booted.measurements[2]
    edited = measurements[2].binary(template_hash=original.template_hash())
    raw = b"".join(m.binary() for m in booted.measurements[:2]) + edited
    raw += b"".join(m.binary() for m in booted.measurements[3:])
    report = check(dataclasses.replace(genuine, ima_log=raw))
    assert report.reasons == {"ima_template_hash_mismatch", "ima_pcr_mismatch"}
    assert "entry 2 (/usr/bin/bash)" in report.failures[0].message
    assert {f.bank for f in report.failures if f.reason == "ima_pcr_mismatch"} == {
        "sha256",
        "sha384",
    }


def test_ima_entry_removed(genuine: Evidence, booted: BootedTpm) -> None:
    shorter = [m for position, m in enumerate(booted.measurements) if position != 4]
    report = check(dataclasses.replace(genuine, ima_log=ima_list(shorter)))
    assert report.reasons == {"ima_pcr_mismatch"}


def test_counters_rolled_back(fresh_booted: BootedTpm, tmp_path: Path) -> None:
    with fresh_booted.client() as client:
        key = client.ensure_attestation_key(AK_HANDLE)
        before_reboot = take_evidence(client, key, fresh_booted)
    fresh_booted.reset()
    fresh_booted.boot()
    with fresh_booted.client() as client:
        key = client.ensure_attestation_key(AK_HANDLE)
        after_reboot = take_evidence(client, key, fresh_booted)
    old = decode_attest(before_reboot.quote).clock_info
    new = decode_attest(after_reboot.quote).clock_info
    assert new.reset_count == old.reset_count + 1
    state_file = tmp_path / "state.json"
    with open_state(state_file) as state:
        accepted = check(after_reboot)
        assert accepted.ok, accepted.failures
        state.record(accepted)
    # The quote from before the reboot, presented after a newer one was accepted.
    stored = load_state(state_file)
    report = check(before_reboot, previous=stored.clock_state(accepted.ak_name))
    assert report.reasons == {"reset_count_rolled_back"}
    assert report.checks[Check.CLOCK] == "failed"


def test_ima_entries_after_the_quote_and_incremental_shipping(
    fresh_booted: BootedTpm, tmp_path: Path
) -> None:
    state_file = tmp_path / "state.json"
    count = len(fresh_booted.measurements)
    with fresh_booted.client() as client:
        key = client.ensure_attestation_key(AK_HANDLE)
        evidence = take_evidence(client, key, fresh_booted)
        # The kernel measures two more files between the quote and the read of the list.
        late = [file_measurement("/usr/bin/late", b"late"), file_measurement("/opt/x", b"x")]
        extend_ima(client, late)
        fresh_booted.measurements.extend(late)
        evidence = dataclasses.replace(evidence, ima_log=ima_list(fresh_booted.measurements))
        with open_state(state_file) as state:
            first = check(evidence)
            assert first.ok, first.failures
            assert any("2 entries are newer than the quote" in note for note in first.notes)
            assert first.ima_progress is not None
            assert first.ima_progress.next_index == count
            state.record(first)

        # Next round: the node ships only what the verifier lacks, from entry `count`.
        more = [file_measurement("/usr/bin/python3", b"python")]
        extend_ima(client, more)
        fresh_booted.measurements.extend(more)
        tail = ima_list(fresh_booted.measurements[count:])
        time.sleep(0.01)
        incremental = dataclasses.replace(
            take_evidence(client, key, fresh_booted), ima_log=tail, ima_start_index=count
        )
    name = first.ak_name
    with open_state(state_file) as state:
        report = check(
            incremental, previous=state.clock_state(name), ima_progress=state.ima_progress(name)
        )
        assert report.ok, report.failures
        assert report.ima_progress is not None
        assert report.ima_progress.next_index == count + 3
    # Without the kept replay point the tail cannot be judged.
    assert check(incremental).reasons == {"ima_start_unknown"}


def test_policy_from_the_known_good_log(genuine: Evidence) -> None:
    policy = make_policy(parse_event_log(real_log()))
    report = check(genuine, policy=policy)
    assert report.ok, report.failures
    assert report.checks[Check.POLICY] == "passed"


def test_policy_of_another_machine_fails_with_policy_reasons(genuine: Evidence) -> None:
    policy = make_policy(parse_event_log(real_log("event-moklisttrusted.bin")))
    report = check(genuine, policy=policy)
    assert not report.ok
    assert all(failure.check == Check.POLICY for failure in report.failures)
    assert "policy_pcr_mismatch" in report.reasons
    assert "policy_event_digest_not_allowed" in report.reasons


def test_policy_needing_an_unquoted_pcr(
    tpm: TpmClient, ak: AttestationKey, booted: BootedTpm
) -> None:
    policy = make_policy(parse_event_log(real_log()), banks=["sha256"])
    evidence = take_evidence(tpm, ak, booted, selection={"sha256": list(range(8))})
    report = check(evidence, policy=policy, expected_selection={"sha256": list(range(8))})
    assert report.reasons == {"policy_pcr_not_quoted"}
    assert {f.pcr for f in report.failures} == {8, 9, 14}


def test_pcr_value_edited_in_the_document(genuine: Evidence) -> None:
    pcrs = {bank: dict(values) for bank, values in genuine.pcrs.items()}
    pcrs["sha256"][4] = hashlib.sha256(b"forged").digest()
    report = check(dataclasses.replace(genuine, pcrs=pcrs))
    # The quote catches it; the log comparison against the forged value says the same PCR.
    assert report.reasons == {"pcr_digest_mismatch", "eventlog_pcr_mismatch"}
    assert {f.pcr for f in report.failures if f.pcr is not None} == {4}
