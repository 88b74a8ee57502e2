"""Boot policies made from real firmware logs, their JSON form, and their evaluation."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.attest.logs.eventlog import EventLog, parse_event_log
from agent.attest.policy import (
    Policy,
    PolicyFinding,
    evaluate,
    load_policy,
    make_policy,
)
from agent.errors import AttestationError, PolicyError
from tests.fuzzing import fuzz

TESTDATA = Path(__file__).resolve().parents[2].parent / "shared/testdata/eventlogs/tpm2-tools"
REAL_LOGS = sorted(path.name for path in TESTDATA.glob("*.bin"))
ARCH = "event-arch-linux.bin"


def raw(name: str) -> bytes:
    return (TESTDATA / name).read_bytes()


def with_digest_changed(name: str, event_index: int, bank: str) -> tuple[EventLog, bytes]:
    """The log with one byte of one event's digest flipped, and the new digest."""
    data = bytearray(raw(name))
    event = parse_event_log(bytes(data)).events[event_index]
    # TCG_PCR_EVENT2: pcrIndex, eventType, count, then (algorithm ID, digest) pairs.
    position = event.offset + 12
    for digest_bank, digest in event.digests.items():
        position += 2
        if digest_bank == bank:
            break
        position += len(digest)
    data[position] ^= 0x01
    log = parse_event_log(bytes(data))
    return log, log.events[event_index].digests[bank]


def without_event(name: str, event_index: int) -> EventLog:
    data = raw(name)
    events = parse_event_log(data).events
    return parse_event_log(
        data[: events[event_index].offset] + data[events[event_index + 1].offset :]
    )


def kinds(findings: list[PolicyFinding]) -> list[str]:
    return [finding.kind for finding in findings]


def test_there_are_real_logs() -> None:
    assert len(REAL_LOGS) >= 10


@pytest.mark.parametrize("name", REAL_LOGS)
def test_policy_made_from_a_real_log_passes_on_it(name: str) -> None:
    log = parse_event_log(raw(name))
    policy = make_policy(log)
    assert evaluate(policy, log.replay(), log) == []
    assert Policy.from_json(policy.to_json()) == policy


def test_changed_event_digest_fails_naming_the_event() -> None:
    log = parse_event_log(raw(ARCH))
    policy = make_policy(log)
    target = next(e for e in log.events if e.type_name == "EV_EFI_BOOT_SERVICES_APPLICATION")
    modified, digest = with_digest_changed(ARCH, target.index, "sha256")
    findings = evaluate(policy, modified.replay(), modified)
    assert kinds(findings) == ["pcr-mismatch", "event-digest-not-allowed"]
    golden, event = findings
    assert (golden.pcr, golden.bank) == (target.pcr, "sha256")
    assert golden.reason.startswith(f"PCR {target.pcr} (sha256) is ")
    assert (event.pcr, event.event_index, event.event_type, event.bank, event.digest) == (
        target.pcr,
        target.index,
        "EV_EFI_BOOT_SERVICES_APPLICATION",
        "sha256",
        digest.hex(),
    )
    assert event.reason == (
        f"PCR {target.pcr} event {target.index} (EV_EFI_BOOT_SERVICES_APPLICATION): sha256 "
        f"digest {digest.hex()} is not a reference value"
    )


def test_event_rules_alone_catch_the_change() -> None:
    log = parse_event_log(raw(ARCH))
    policy = make_policy(log, golden=False)
    target = next(e for e in log.events if e.type_name == "EV_EFI_VARIABLE_DRIVER_CONFIG")
    modified, digest = with_digest_changed(ARCH, target.index, "sha1")
    (finding,) = evaluate(policy, modified.replay(), modified)
    assert finding.kind == "event-digest-not-allowed"
    assert (finding.event_index, finding.bank, finding.digest) == (
        target.index,
        "sha1",
        digest.hex(),
    )


def test_golden_pcrs_alone_catch_the_change() -> None:
    log = parse_event_log(raw("event-gce-ubuntu-2104-log.bin"))
    policy = make_policy(log, reference_events=False, pcrs=[4, 7])
    target = next(e for e in log.events if e.pcr == 7 and e.extends)
    modified, _ = with_digest_changed("event-gce-ubuntu-2104-log.bin", target.index, "sha384")
    findings = evaluate(policy, modified.replay(), modified)
    assert [(f.kind, f.pcr, f.bank) for f in findings] == [("pcr-mismatch", 7, "sha384")]


def test_log_that_does_not_produce_the_pcrs_is_rejected() -> None:
    log = parse_event_log(raw(ARCH))
    policy = make_policy(log, golden=False, pcrs=[4])
    target = next(e for e in log.events if e.pcr == 4 and e.type_name != "EV_SEPARATOR")
    modified, _ = with_digest_changed(ARCH, target.index, "sha256")
    findings = evaluate(policy, log.replay(), modified)
    assert ("log-replay-mismatch", 4, "sha256") in [(f.kind, f.pcr, f.bank) for f in findings]


def test_event_type_not_in_the_policy() -> None:
    log = parse_event_log(raw("event-bootorder.bin"))
    action = next(e for e in log.events if e.type_name == "EV_EFI_ACTION")
    policy = Policy.from_dict(
        {
            "version": 1,
            "reference_events": {
                str(action.pcr): {"EV_EFI_ACTION": {"sha256": [action.digests["sha256"].hex()]}}
            },
        }
    )
    findings = evaluate(policy, log.replay(), log)
    rejected = [f for f in findings if f.kind == "event-type-not-allowed"]
    assert rejected
    assert all(f.pcr == action.pcr and f.event_type != "EV_EFI_ACTION" for f in rejected)
    assert f"the policy allows no {rejected[0].event_type} events in PCR {action.pcr}" in (
        rejected[0].reason
    )


def test_missing_separator_is_reported() -> None:
    log = parse_event_log(raw(ARCH))
    separator = next(e for e in log.events if e.type_name == "EV_SEPARATOR" and e.pcr == 7)
    modified = without_event(ARCH, separator.index)
    policy = make_policy(log, pcrs=[7], golden=False)
    assert policy.separator_pcrs == {7}
    (finding,) = evaluate(policy, modified.replay(), modified)
    assert (finding.kind, finding.pcr) == ("separator-missing", 7)
    # A policy written by hand requires separators in the PCRs 0-7 it covers by default.
    document = policy.to_dict()
    del document["separator_pcrs"]
    assert Policy.from_dict(document) == policy
    document["separator_pcrs"] = []
    assert evaluate(Policy.from_dict(document), modified.replay(), modified) == []


def test_event_log_errors_fail_the_policy() -> None:
    log = parse_event_log(raw(ARCH))
    separator = next(e for e in log.events if e.type_name == "EV_SEPARATOR")
    modified, _ = with_digest_changed(ARCH, separator.index, "sha1")
    policy = make_policy(modified)
    findings = evaluate(policy, modified.replay(), modified)
    assert kinds(findings) == ["log-error"]
    assert findings[0].event_index == separator.index
    assert "is not the hash of its data" in findings[0].reason


def test_bank_missing_from_the_pcr_values() -> None:
    log = parse_event_log(raw("event-gce-ubuntu-2104-log.bin"))
    policy = make_policy(log, banks=["sha384"], reference_events=False)
    replayed = {bank: values for bank, values in log.replay().items() if bank != "sha384"}
    assert kinds(evaluate(policy, replayed, log)) == ["bank-missing"]


def test_event_with_no_bank_the_policy_lists_is_unconstrained() -> None:
    gce = parse_event_log(raw("event-gce-ubuntu-2104-log.bin"))
    policy = make_policy(gce, banks=["sha384"], golden=False, pcrs=[4])
    arch = parse_event_log(raw(ARCH))
    findings = evaluate(policy, arch.replay(), arch)
    assert "event-unconstrained" in kinds(findings)
    assert "no-common-bank" not in kinds(findings)


def test_no_common_bank_between_log_and_pcrs() -> None:
    log = parse_event_log(raw("event-sd-boot-fedora37.bin"))
    policy = make_policy(log, golden=False)
    findings = evaluate(policy, {"sha1": {}}, log)
    assert kinds(findings) == ["no-common-bank"]


def test_hex_event_type_names_are_accepted() -> None:
    document = {"version": 1, "reference_events": {"8": {"0x0000000D": {"sha1": ["00" * 20]}}}}
    policy = Policy.from_dict(document)
    assert set(policy.reference_events[8]) == {"EV_IPL"}


def test_load_policy(tmp_path: Path) -> None:
    policy = make_policy(parse_event_log(raw(ARCH)))
    path = tmp_path / "policy.json"
    path.write_text(policy.to_json())
    assert load_policy(path) == policy
    with pytest.raises(PolicyError, match="cannot read policy"):
        load_policy(tmp_path / "missing.json")


def test_policy_error_is_an_attestation_error() -> None:
    assert issubclass(PolicyError, AttestationError)
    assert PolicyError.exit_code == 2


SHA256_ZERO = "00" * 32


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "policy: must be a JSON object"),
        ({"version": 1, "golden": {}}, "golden: unknown key"),
        ({"golden_pcrs": {"sha256": {"0": SHA256_ZERO}}}, "version: required"),
        ({"version": 2}, "version: 2 is not supported"),
        ({"version": True, "golden_pcrs": {}}, "version: True is not supported"),
        ({"version": 1}, "golden_pcrs: a policy needs golden PCRs or reference events"),
        ({"version": 1, "description": 3}, "description: must be a string"),
        (
            {"version": 1, "golden_pcrs": {"sha1": {"0": "00" * 20}}, "separator_pcrs": [8]},
            "separator_pcrs[0]: must be a PCR number 0-7",
        ),
        (
            {"version": 1, "golden_pcrs": {"sha1": {"0": "00" * 20}}, "separator_pcrs": 7},
            "separator_pcrs: must be a list",
        ),
        ({"version": 1, "golden_pcrs": []}, "golden_pcrs: must be an object"),
        ({"version": 1, "golden_pcrs": {"md5": {}}}, "golden_pcrs.md5: unknown bank"),
        ({"version": 1, "golden_pcrs": {"sha256": []}}, "golden_pcrs.sha256: must be an object"),
        (
            {"version": 1, "golden_pcrs": {"sha256": {"24": SHA256_ZERO}}},
            "golden_pcrs.sha256.24: PCR must be a decimal number 0-23",
        ),
        (
            {"version": 1, "golden_pcrs": {"sha256": {"-1": SHA256_ZERO}}},
            "golden_pcrs.sha256.-1: PCR must be",
        ),
        (
            {"version": 1, "golden_pcrs": {"sha256": {"7": "00" * 20}}},
            "golden_pcrs.sha256.7: must be a sha256 digest, 64 hex characters",
        ),
        (
            {"version": 1, "golden_pcrs": {"sha256": {"7": "zz" * 32}}},
            "golden_pcrs.sha256.7: must be a sha256 digest",
        ),
        (
            {"version": 1, "golden_pcrs": {"sha256": {"7": "00 " * 21 + "0"}}},
            "golden_pcrs.sha256.7: must be a sha256 digest",
        ),
        (
            {"version": 1, "golden_pcrs": {"sha256": {"7": 7}}},
            "golden_pcrs.sha256.7: must be a sha256 digest",
        ),
        ({"version": 1, "reference_events": []}, "reference_events: must be an object"),
        (
            {"version": 1, "reference_events": {"4": {"EV_BOGUS": {}}}},
            "reference_events.4.EV_BOGUS: not an event type name",
        ),
        (
            {"version": 1, "reference_events": {"4": []}},
            "reference_events.4: must be an object",
        ),
        (
            {"version": 1, "reference_events": {"4": {"EV_IPL": {"sha256": SHA256_ZERO}}}},
            "reference_events.4.EV_IPL.sha256: must be a list",
        ),
        (
            {"version": 1, "reference_events": {"4": {"EV_IPL": {"sha256": [SHA256_ZERO, "0"]}}}},
            "reference_events.4.EV_IPL.sha256[1]: must be a sha256 digest",
        ),
        (
            {
                "version": 1,
                "reference_events": {"4": {"EV_IPL": {}, "0x0000000D": {}}},
            },
            "reference_events.4.0x0000000D: event type listed twice",
        ),
    ],
)
def test_invalid_policies_name_the_key(document: object, message: str) -> None:
    with pytest.raises(PolicyError) as raised:
        Policy.from_dict(document)
    assert str(raised.value).startswith(message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "policy is not valid JSON"),
        ('{"version": 1, "version": 1}', "version: duplicate key"),
        ("[" * 100_000 + "]" * 100_000, "policy is not valid JSON"),
        ("\xff", "policy is not valid JSON"),
    ],
)
def test_invalid_json(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=f"^{message}"):
        Policy.from_json(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=70),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(
        st.sampled_from(
            ["version", "golden_pcrs", "reference_events", "sha256", "sha1", "4", "7", "EV_IPL"]
        )
        | st.text(max_size=8),
        children,
        max_size=4,
    ),
    max_leaves=10,
)


@fuzz(150)
@given(
    st.fixed_dictionaries(
        {"version": st.sampled_from([1, 1, 2])},
        optional={"golden_pcrs": json_values, "reference_events": json_values},
    )
    | json_values
)
def test_fuzz_policy_documents(document: object) -> None:
    try:
        policy = Policy.from_dict(document)
    except PolicyError:
        return
    assert Policy.from_json(policy.to_json()) == policy


@fuzz(300)
@given(st.text(max_size=300))
def test_fuzz_policy_text(text: str) -> None:
    with contextlib.suppress(PolicyError):
        Policy.from_json(text)


def test_to_dict_is_json() -> None:
    policy = make_policy(parse_event_log(raw(ARCH)), description="arch known-good")
    document = json.loads(policy.to_json())
    assert document["version"] == 1
    assert document["description"] == "arch known-good"
    assert set(document["golden_pcrs"]) == {"sha1", "sha256"}
    finding = PolicyFinding("pcr-mismatch", "x", pcr=1)
    assert json.loads(json.dumps(finding.to_dict()))["pcr"] == 1


@pytest.mark.parametrize("key", ["²", "1٠", "١"])  # noqa: RUF001 - the point of the test
def test_non_ascii_digit_pcr_keys_are_refused_not_crashed(key: str) -> None:
    document = {"version": 1, "golden_pcrs": {"sha256": {key: "00" * 32}}}
    with pytest.raises(AttestationError, match="PCR"):
        Policy.from_dict(document)
