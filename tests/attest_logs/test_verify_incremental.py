"""verify_evidence as a controller calls it every interval: new IMA entries from a kept
ImaProgress, lists that run past the quote, the legacy padded replay, and the parsed event
log kept between calls. Quotes are signed by a software P-256 key (agent/bench/attest.py's
software_quote); the expected PCR 10 values come from the kernel model of test_ima.py.
"""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.attest.evidence import Evidence
from agent.attest.logs.eventlog import parse_event_log
from agent.attest.tpm.algorithms import BANKS, initial_pcr_value
from agent.attest.tpm.checks import ClockState
from agent.attest.tpm.wire import compute_name
from agent.attest.verify.engine import _EventLogCache, verify_evidence
from agent.attest.verify.report import ImaProgress, VerificationReport
from agent.bench.attest import software_quote, synthetic_event_log
from agent.errors import EventLogError
from tests.attest_logs.test_ima import Measurement, expected_pcr, ima_ng, violation
from tests.attest_logs.test_ima_variants import binary_list

EVENT_LOG = synthetic_event_log(4096)
FIRMWARE = parse_event_log(EVENT_LOG).replay()["sha256"]
KEY = ec.generate_private_key(ec.SECP256R1())


def entries(count: int) -> list[Measurement]:
    return [violation(b"/v%d" % i) if i % 7 == 3 else ima_ng(b"/f%d" % i) for i in range(count)]


def evidence(
    pcr10: bytes,
    shipped: list[Measurement],
    start: int,
    clock: int,
    pcr11: bytes | None = None,
) -> tuple[Evidence, bytes]:
    values = {p: FIRMWARE.get(p, initial_pcr_value(BANKS["sha256"], p)) for p in range(24)}
    values[10] = pcr10
    if pcr11 is not None:
        values[11] = pcr11
    nonce = os.urandom(16)
    ak_public, attest, signature, pcrs = software_quote(KEY, nonce, values, clock=clock)
    document = Evidence(
        ak_public, attest, signature, pcrs, nonce, EVENT_LOG, binary_list(shipped), start
    )
    return document, nonce


def verify(
    document: Evidence,
    nonce: bytes,
    previous: ClockState | None = None,
    progress: ImaProgress | None = None,
) -> VerificationReport:
    return verify_evidence(
        document,
        nonce,
        None,
        previous,
        {"sha256": list(range(24))},
        enrolled_ak_name=compute_name(document.ak_public),
        ima_progress=progress,
    )


def test_intervals_of_new_entries_verify_from_the_kept_progress() -> None:
    measurements = entries(40)
    first, nonce = evidence(expected_pcr(measurements[:10], "sha256"), measurements[:10], 0, 1000)
    report = verify(first, nonce)
    assert report.ok, report.failures
    for interval in range(1, 4):
        start, end = interval * 10, interval * 10 + 10
        assert report.ima_progress is not None
        assert report.ima_progress.next_index == start
        document, nonce = evidence(
            expected_pcr(measurements[:end], "sha256"),
            measurements[start:end],
            start,
            1000 + interval,
        )
        report = verify(document, nonce, report.clock_state, report.ima_progress)
        assert report.ok, report.failures
        assert report.checks["ima"] == "passed"
    assert report.ima_progress == ImaProgress(
        3, 40, {"sha256": {10: expected_pcr(measurements, "sha256")}}
    )


@pytest.mark.parametrize("covered", [0, 1, 6, 11])
def test_a_list_longer_than_the_quote_verifies_its_covered_prefix(covered: int) -> None:
    measurements = entries(12)
    pcr10 = expected_pcr(measurements[:covered], "sha256")
    document, nonce = evidence(pcr10, measurements, 0, 2000)
    report = verify(document, nonce)
    assert report.ok, report.failures
    assert report.ima_progress is not None
    assert report.ima_progress.next_index == covered
    assert any(f"{12 - covered} entries are newer than the quote" in n for n in report.notes)


@pytest.mark.parametrize(("pcr10_after", "covered"), [(2, 3), (3, 4)])
def test_an_entry_in_another_pcr_does_not_end_the_covered_prefix(
    pcr10_after: int, covered: int
) -> None:
    # Entry 2 extends PCR 11 only: once PCR 10 matches after entry 1, the prefix runs on
    # through entry 2 up to the next entry that changes a quoted PCR.
    other = Measurement("ima-ng", ima_ng(b"/x").fields, pcr=11)
    measurements = [*entries(2), other, ima_ng(b"/y")]
    tenth = [m for m in measurements if m.pcr == 10][:pcr10_after]
    document, nonce = evidence(
        expected_pcr(tenth, "sha256"), measurements, 0, 2000, expected_pcr([other], "sha256", 11)
    )
    report = verify(document, nonce)
    assert report.ok, report.failures
    assert report.ima_progress is not None
    assert report.ima_progress.next_index == covered
    assert set(report.ima_progress.pcrs["sha256"]) == {10, 11}


def test_a_legacy_kernel_is_recognised() -> None:
    measurements = entries(9)
    value = bytes(32)
    for m in measurements:
        sha1 = b"\xff" * 20 if m.violation else m.template_hash("sha1")
        value = hashlib.sha256(value + sha1 + bytes(12)).digest()
    document, nonce = evidence(value, measurements, 0, 3000)
    report = verify(document, nonce)
    assert report.ok, report.failures
    assert any("zero-padded" in note for note in report.notes)


def test_no_prefix_matching_the_quote_is_a_mismatch() -> None:
    measurements = entries(5)
    document, nonce = evidence(b"\x42" * 32, measurements, 0, 4000)
    report = verify(document, nonce)
    (failure,) = report.failures
    assert (failure.reason, failure.pcr, failure.bank) == ("ima_pcr_mismatch", 10, "sha256")
    assert f"replays to {expected_pcr(measurements, 'sha256').hex()}" in failure.message
    assert "(entries 0-4)" in failure.message


def test_a_tampered_entry_is_reported_and_the_rest_still_replays() -> None:
    measurements = entries(5)
    listed = bytearray(binary_list(measurements))
    listed[-1] ^= 1  # the last file name's last byte
    document, nonce = evidence(expected_pcr(measurements, "sha256"), measurements, 0, 5000)
    tampered = Evidence(
        document.ak_public,
        document.quote,
        document.signature,
        document.pcrs,
        document.nonce,
        EVENT_LOG,
        bytes(listed),
        0,
    )
    report = verify(tampered, nonce)
    assert "ima_template_hash_mismatch" in report.reasons
    message = next(f.message for f in report.failures if f.reason == "ima_template_hash_mismatch")
    assert message.startswith("1 IMA entries do not hash to their template hash: entry 4 (/f")


# --- The parsed event log kept between verifications ---


def test_the_event_log_cache_keeps_recent_logs_by_content() -> None:
    cache = _EventLogCache(2)
    logs = [synthetic_event_log(size) for size in (1000, 2000, 3000)]
    first = cache.get(logs[0])
    assert cache.get(bytes(bytearray(logs[0]))) is first  # same bytes, another object
    assert first == parse_event_log(logs[0])
    second = cache.get(logs[1])
    cache.get(logs[0])  # the most recent again
    cache.get(logs[2])  # evicts logs[1], the least recently used
    assert cache.get(logs[0]) is first
    assert cache.get(logs[1]) is not second
    assert cache.get(logs[1]) == second


def test_malformed_logs_are_refused_every_time() -> None:
    cache = _EventLogCache(4)
    for _ in range(2):
        with pytest.raises(EventLogError, match=r"^offset 0: event log is empty"):
            cache.get(b"")
    assert cache.get(EVENT_LOG).replay()["sha256"] == FIRMWARE


def test_a_kept_logs_replay_cannot_be_changed_by_a_caller() -> None:
    log = _EventLogCache(1).get(EVENT_LOG)
    log.replay()["sha256"][0] = b"\x00" * 32
    assert log.replay()["sha256"] == FIRMWARE
