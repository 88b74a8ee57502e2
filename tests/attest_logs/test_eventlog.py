"""TCG firmware event log parser and replay, against real logs and hostile input.

The real logs and their expected PCRs come from tpm2-tools' test suite (tpm2_eventlog output,
``pcrs:`` per bank); see ../shared/testdata/eventlogs/tpm2-tools/LICENSE.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from agent.attest.logs.eventlog import (
    MAX_EVENT_DATA_BYTES,
    MAX_EVENTS,
    MAX_LOG_BYTES,
    Event,
    EventLog,
    parse_event_log,
    read_event_log,
)
from agent.attest.tpm.algorithms import BANKS
from agent.errors import EventLogError
from tests.fuzzing import MUTATIONS, fuzz, mutate, random_mutations

TESTDATA = Path(__file__).resolve().parents[2].parent / "shared/testdata/eventlogs/tpm2-tools"
REAL_LOGS = [
    "event-arch-linux.bin",
    "event-bootorder.bin",
    "event-gce-ubuntu-2104-log.bin",
    "event-moklisttrusted.bin",
    "event-postcode.bin",
    "event-sd-boot-fedora37.bin",
    "event-uefi-sha1-log.bin",
    "event-uefiaction.bin",
    "event-uefiservices.bin",
    "event-uefivar.bin",
]
SHA1, SHA256 = 0x0004, 0x000B
EV_NO_ACTION, EV_SEPARATOR, EV_EFI_ACTION, EV_EFI_HCRTM_EVENT = 3, 4, 0x80000007, 0x80000010
EV_S_CRTM_VERSION, EV_POST_CODE = 8, 1


def real_log(name: str) -> bytes:
    return (TESTDATA / name).read_bytes()


def expected_pcrs(name: str) -> dict[str, dict[int, bytes]]:
    """The ``pcrs:`` section tpm2_eventlog printed (hex integers, one per PCR and bank)."""
    text = (TESTDATA / f"{name}.yaml").read_text()
    section = yaml.safe_load(text[text.index("\npcrs:") :])["pcrs"]
    return {
        bank: {int(pcr): value.to_bytes(BANKS[bank].digest_size, "big") for pcr, value in v.items()}
        for bank, v in section.items()
    }


# --- Log builders (TCG PC Client PFP 10.2.1 TCG_PCR_EVENT, 10.2.2 TCG_PCR_EVENT2) ---


def pcr_event(pcr: int, event_type: int, sha1: bytes, data: bytes) -> bytes:
    return struct.pack("<II", pcr, event_type) + sha1 + struct.pack("<I", len(data)) + data


def spec_id_data(algorithms: list[tuple[int, int]], vendor: bytes = b"") -> bytes:
    return (
        b"Spec ID Event03\x00"
        + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(algorithms))
        + b"".join(struct.pack("<HH", alg, size) for alg, size in algorithms)
        + bytes([len(vendor)])
        + vendor
    )


def spec_id_event(banks: list[str]) -> bytes:
    algorithms = [(BANKS[b].algorithm_id, BANKS[b].digest_size) for b in banks]
    return pcr_event(0, EV_NO_ACTION, bytes(20), spec_id_data(algorithms))


def pcr_event2(pcr: int, event_type: int, digests: dict[str, bytes], data: bytes) -> bytes:
    body = b"".join(struct.pack("<H", BANKS[b].algorithm_id) + d for b, d in digests.items())
    return (
        struct.pack("<III", pcr, event_type, len(digests))
        + body
        + struct.pack("<I", len(data))
        + data
    )


def measured(pcr: int, event_type: int, data: bytes, banks: list[str]) -> bytes:
    """An event whose digests are the hash of its data, as firmware measures most events."""
    return pcr_event2(pcr, event_type, {b: BANKS[b].digest(data) for b in banks}, data)


def serialize(log: EventLog) -> bytes:
    """Write a parsed log back in its own format."""
    if log.format == "sha1":
        return b"".join(
            pcr_event(e.pcr, e.event_type, e.digests["sha1"], e.data) for e in log.events
        )
    header = log.events[0]
    return pcr_event(header.pcr, header.event_type, header.digests["sha1"], header.data) + b"".join(
        pcr_event2(e.pcr, e.event_type, dict(e.digests), e.data) for e in log.events[1:]
    )


def fold(bank: str, start: bytes, digests: list[bytes]) -> bytes:
    value = start
    for digest in digests:
        value = hashlib.new(bank, value + digest).digest()
    return value


def startup_locality(locality: int, banks: list[str]) -> bytes:
    data = b"StartupLocality\x00" + bytes([locality])
    return pcr_event2(0, EV_NO_ACTION, {b: bytes(BANKS[b].digest_size) for b in banks}, data)


# --- Real logs ---


@pytest.mark.parametrize("name", REAL_LOGS)
def test_real_log_replays_to_the_pcrs_tpm2_tools_computed(name: str) -> None:
    log = parse_event_log(real_log(name))
    assert log.replay() == expected_pcrs(name)


@pytest.mark.parametrize("name", REAL_LOGS)
def test_real_log_events_match_tpm2_tools(name: str) -> None:
    log = parse_event_log(real_log(name))
    text = (TESTDATA / f"{name}.yaml").read_text()
    assert [e.type_name for e in log.events] == re.findall(r"EventType: (\S+)", text)
    assert [e.pcr for e in log.events] == [int(p) for p in re.findall(r"PCRIndex: (\d+)", text)]
    listed = re.findall(r'AlgorithmId: (\w+)\n\s+Digest: "([0-9a-f]+)"', text)
    events = log.events if log.format == "sha1" else log.events[1:]
    parsed = [(bank, digest.hex()) for e in events for bank, digest in e.digests.items()]
    assert parsed == listed


@pytest.mark.parametrize("name", REAL_LOGS)
def test_real_log_round_trips_byte_for_byte(name: str) -> None:
    data = real_log(name)
    assert serialize(parse_event_log(data)) == data


@pytest.mark.parametrize("name", REAL_LOGS)
def test_real_log_to_dict_is_json(name: str) -> None:
    log = parse_event_log(real_log(name))
    document = json.loads(json.dumps(log.to_dict()))
    assert len(document["events"]) == len(log.events)
    assert document["pcrs"] == {
        bank: {str(pcr): value.hex() for pcr, value in sorted(values.items())}
        for bank, values in expected_pcrs(name).items()
    }


def test_real_sha1_format_log_is_recognised() -> None:
    log = parse_event_log(real_log("event-uefi-sha1-log.bin"))
    assert log.format == "sha1"
    assert log.spec_id is None
    assert log.algorithms == {"sha1": 20}
    assert log.events[0].type_name == "EV_S_CRTM_VERSION"


@pytest.mark.parametrize(
    "name",
    ["event-arch-linux.bin", "event-bootorder.bin", "event-gce-ubuntu-2104-log.bin"],
)
def test_sha1_format_log_built_from_a_real_logs_sha1_bank_replays_to_its_sha1_pcrs(
    name: str,
) -> None:
    agile = parse_event_log(real_log(name))
    sha1_log = b"".join(
        pcr_event(e.pcr, e.event_type, e.digests["sha1"], e.data) for e in agile.events[1:]
    )
    log = parse_event_log(sha1_log)
    assert log.format == "sha1"
    assert log.replay() == {"sha1": expected_pcrs(name)["sha1"]}


def test_crypto_agile_header_is_decoded() -> None:
    log = parse_event_log(real_log("event-gce-ubuntu-2104-log.bin"))
    assert log.format == "crypto-agile"
    assert log.spec_id is not None
    assert [a.name for a in log.spec_id.algorithms] == ["sha1", "sha256", "sha384"]
    assert log.algorithms == {"sha1": 20, "sha256": 32, "sha384": 48}
    decoded = log.to_dict()["events"]
    assert isinstance(decoded, list)
    assert decoded[0]["decoded"]["algorithms"][2] == {"algorithm": "sha384", "digest_size": 48}


def test_declared_but_unused_banks_are_not_replayed() -> None:
    # This log's Spec ID event declares sha384 and sha512 but its events carry sha1 and sha256.
    log = parse_event_log(real_log("event-uefiaction.bin"))
    assert set(log.algorithms) == {"sha1", "sha256", "sha384", "sha512"}
    assert log.replayable_banks == ("sha1", "sha256")
    assert {f.kind for f in log.findings} == {"bank-unused"}


def test_uefi_variable_events_are_decoded() -> None:
    log = parse_event_log(real_log("event-sd-boot-fedora37.bin"))
    variables = [
        e.to_dict()["decoded"] for e in log.events if e.type_name == "EV_EFI_VARIABLE_DRIVER_CONFIG"
    ]
    assert [v["variable_name"] for v in variables] == ["SecureBoot", "PK", "KEK", "db", "dbx"]  # type: ignore[index]
    assert variables[0]["variable_guid"] == "8be4df61-93ca-11d2-aa0d-00e098032b8c"  # type: ignore[index]


def test_a_bank_missing_from_some_events_is_not_replayed() -> None:
    banks = ["sha1", "sha256"]
    data = (
        spec_id_event(banks)
        + measured(4, EV_EFI_ACTION, b"one", banks)
        + measured(4, EV_EFI_ACTION, b"two", ["sha1"])
    )
    log = parse_event_log(data)
    assert log.replayable_banks == ("sha1",)
    (finding,) = log.findings
    assert finding.severity == "error"
    assert finding.kind == "bank-incomplete"
    assert finding.event_index == 2


def test_read_event_log_reads_a_file() -> None:
    log = read_event_log(TESTDATA / "event-postcode.bin")
    assert log.replay() == expected_pcrs("event-postcode.bin")


def test_read_event_log_translates_os_errors(tmp_path: Path) -> None:
    with pytest.raises(EventLogError, match=r"cannot read event log .*missing"):
        read_event_log(tmp_path / "missing")
    with pytest.raises(EventLogError, match="cannot read event log"):
        read_event_log(tmp_path)


# --- StartupLocality and H-CRTM (PFP 10.4.5.3) ---


def test_startup_locality_3_sets_pcr0_start_value() -> None:
    banks = ["sha1", "sha256"]
    crtm = measured(0, EV_S_CRTM_VERSION, b"v1", banks)
    data = (
        spec_id_event(banks) + startup_locality(3, banks) + crtm + measured(7, 4, bytes(4), banks)
    )
    log = parse_event_log(data)
    assert log.startup_locality == 3
    replayed = log.replay()
    for bank in banks:
        start = bytes(BANKS[bank].digest_size - 1) + b"\x03"
        assert replayed[bank][0] == fold(bank, start, [hashlib.new(bank, b"v1").digest()])
        assert replayed[bank][7] == fold(
            bank, bytes(BANKS[bank].digest_size), [hashlib.new(bank, bytes(4)).digest()]
        )
    assert log.findings == ()


def test_startup_locality_alone_still_gives_pcr0_its_start_value() -> None:
    data = spec_id_event(["sha256"]) + startup_locality(3, ["sha256"])
    assert parse_event_log(data).replay() == {"sha256": {0: bytes(31) + b"\x03"}}


def test_startup_locality_inserted_into_a_real_log() -> None:
    original = parse_event_log(real_log("event-arch-linux.bin"))
    raw = real_log("event-arch-linux.bin")
    header_size = original.events[1].offset
    banks = list(original.replayable_banks)
    modified = raw[:header_size] + startup_locality(3, banks) + raw[header_size:]
    replayed = parse_event_log(modified).replay()
    expected = expected_pcrs("event-arch-linux.bin")
    for bank in banks:
        pcr0 = [e.digests[bank] for e in original.events if e.pcr == 0 and e.extends]
        start = bytes(BANKS[bank].digest_size - 1) + b"\x03"
        assert replayed[bank][0] == fold(bank, start, pcr0)
        assert replayed[bank][0] != expected[bank][0]
        assert {p: v for p, v in replayed[bank].items() if p} == {
            p: v for p, v in expected[bank].items() if p
        }


def test_h_crtm_starts_pcr0_at_4_and_extends_the_hcrtm_digest() -> None:
    banks = ["sha256", "sha384"]
    # TCG_HCRTMComponentEvent: informational, never extended.
    component = (
        b"H-CRTM CompMeas\x00"
        + bytes([6])
        + b"H-CRTM"
        + b"\x00"
        + struct.pack("<H", 34)
        + struct.pack("<H", SHA256)
        + bytes(32)
    )
    hcrtm_digests = {b: hashlib.new(b, b"h-crtm code").digest() for b in banks}
    data = (
        spec_id_event(banks)
        + startup_locality(4, banks)
        + pcr_event2(0, EV_NO_ACTION, {b: bytes(BANKS[b].digest_size) for b in banks}, component)
        + pcr_event2(0, EV_EFI_HCRTM_EVENT, hcrtm_digests, b"HCRTM")
        + measured(0, EV_POST_CODE, b"next", banks)
    )
    log = parse_event_log(data)
    assert log.findings == ()
    assert log.startup_locality == 4
    for bank in banks:
        start = bytes(BANKS[bank].digest_size - 1) + b"\x04"
        expected = fold(bank, start, [hcrtm_digests[bank], hashlib.new(bank, b"next").digest()])
        assert log.replay()[bank] == {0: expected}
    described = log.events[2].to_dict()["decoded"]
    assert described == {"signature": "H-CRTM CompMeas", "component_description": "H-CRTM"}


def test_locality_4_without_hcrtm_event_is_reported() -> None:
    data = (
        spec_id_event(["sha256"])
        + startup_locality(4, ["sha256"])
        + measured(0, EV_POST_CODE, b"x", ["sha256"])
    )
    assert [f.kind for f in parse_event_log(data).findings] == ["hcrtm-missing"]


def test_startup_locality_after_pcr0_extend_is_ignored_and_reported() -> None:
    banks = ["sha256"]
    data = (
        spec_id_event(banks)
        + measured(0, EV_POST_CODE, b"first", banks)
        + startup_locality(3, banks)
    )
    log = parse_event_log(data)
    assert log.startup_locality is None
    assert log.replay()["sha256"][0] == fold(
        "sha256", bytes(32), [hashlib.sha256(b"first").digest()]
    )
    (finding,) = log.findings
    assert (finding.severity, finding.kind, finding.event_index) == (
        "error",
        "startup-locality-late",
        2,
    )


def test_startup_locality_outside_pcr0_is_ignored_and_reported() -> None:
    event = pcr_event2(3, EV_NO_ACTION, {"sha256": bytes(32)}, b"StartupLocality\x00\x03")
    log = parse_event_log(spec_id_event(["sha256"]) + event)
    assert log.startup_locality is None
    assert [f.kind for f in log.findings] == ["startup-locality-malformed"]


def test_no_action_events_are_never_extended() -> None:
    banks = ["sha256"]
    noise = pcr_event2(5, EV_NO_ACTION, {"sha256": b"\x11" * 32}, b"anything")
    data = spec_id_event(banks) + measured(5, EV_EFI_ACTION, b"a", banks) + noise
    assert parse_event_log(data).replay() == {
        "sha256": {5: fold("sha256", bytes(32), [hashlib.sha256(b"a").digest()])}
    }


# --- Separators (PFP 10.4.4) ---


def _with_event(log: EventLog, index: int, **changes: object) -> EventLog:
    events = list(log.events)
    events[index] = replace(events[index], **changes)  # type: ignore[arg-type]
    return parse_event_log(serialize(replace(log, events=tuple(events))))


def test_error_separator_is_reported() -> None:
    log = parse_event_log(real_log("event-arch-linux.bin"))
    index = next(e.index for e in log.events if e.type_name == "EV_SEPARATOR")
    data = b"\xff\xff\xff\xff"
    digests = {b: BANKS[b].digest(data) for b in log.events[index].digests}
    modified = _with_event(log, index, data=data, digests=digests)
    (finding,) = modified.findings
    assert (finding.severity, finding.kind, finding.event_index) == (
        "error",
        "separator-error",
        index,
    )


def test_separator_digest_not_matching_its_data_is_reported() -> None:
    log = parse_event_log(real_log("event-postcode.bin"))
    index = [e.index for e in log.events if e.type_name == "EV_SEPARATOR"][3]
    digests = dict(log.events[index].digests)
    digests["sha256"] = bytes(32)
    modified = _with_event(log, index, digests=digests)
    (finding,) = modified.findings
    assert finding.kind == "separator-digest"
    assert finding.event_index == index
    assert "sha256" in finding.message


def test_separator_with_unexpected_value_is_reported() -> None:
    data = spec_id_event(["sha256"]) + measured(4, EV_SEPARATOR, b"\x02\x00\x00\x00", ["sha256"])
    assert [f.kind for f in parse_event_log(data).findings] == ["separator-value"]


def test_pfp_error_separator_is_reported() -> None:
    # PFP 10.4.4 (EDK2's MeasureSeparatorEventWithError): 0x00000001 after a firmware error.
    data = spec_id_event(["sha256"]) + measured(4, EV_SEPARATOR, b"\x01\x00\x00\x00", ["sha256"])
    (finding,) = parse_event_log(data).findings
    assert (finding.severity, finding.kind) == ("error", "separator-error")
    assert "0x00000001" in finding.message


# --- Malformed and hostile input ---


def _error(data: bytes) -> str:
    with pytest.raises(EventLogError) as raised:
        parse_event_log(data)
    return str(raised.value)


def test_truncated_log_names_the_offset() -> None:
    data = real_log("event-arch-linux.bin")
    log = parse_event_log(data)
    cut = log.events[5].offset + 20
    message = _error(data[:cut])
    assert message.startswith(f"offset {log.events[5].offset + 14}:")
    assert "event 5" in message


def test_event_data_size_over_the_limit() -> None:
    header = spec_id_event(["sha256"])
    event = struct.pack("<IIIH", 4, EV_EFI_ACTION, 1, SHA256) + bytes(32)
    data = header + event + struct.pack("<I", MAX_EVENT_DATA_BYTES + 1)
    assert _error(data) == (
        f"offset {len(header) + len(event)}: event data size {MAX_EVENT_DATA_BYTES + 1} is "
        f"over the {MAX_EVENT_DATA_BYTES}-byte limit"
    )


def test_more_digests_than_declared_algorithms() -> None:
    header = spec_id_event(["sha256"])
    event = struct.pack("<III", 4, EV_EFI_ACTION, 2)
    assert _error(header + event + bytes(100)) == (
        f"offset {len(header) + 8}: event 1 has 2 digests but the log declares 1 algorithms"
    )


def test_digest_for_an_undeclared_algorithm() -> None:
    header = spec_id_event(["sha256"])
    event = pcr_event2(4, EV_EFI_ACTION, {"sha1": bytes(20)}, b"")
    assert "algorithm 0x0004, which the Spec ID event does not declare" in _error(header + event)


def test_two_digests_of_one_algorithm() -> None:
    header = spec_id_event(["sha1", "sha256"])
    event = (
        struct.pack("<III", 4, EV_EFI_ACTION, 2)
        + (struct.pack("<H", SHA1) + bytes(20)) * 2
        + struct.pack("<I", 0)
    )
    assert "event 1 has two sha1 digests" in _error(header + event)


@pytest.mark.parametrize("count", [0, 9, 0xFFFFFFFF])
def test_algorithm_count_out_of_bounds(count: int) -> None:
    data = spec_id_data([(SHA256, 32)])
    data = data[:24] + struct.pack("<I", count) + data[28:]
    assert "numberOfAlgorithms is" in _error(pcr_event(0, EV_NO_ACTION, bytes(20), data))


def test_known_algorithm_with_wrong_size() -> None:
    header = pcr_event(0, EV_NO_ACTION, bytes(20), spec_id_data([(SHA256, 20)]))
    assert "sha256 declared with digest size 20, the algorithm's size is 32" in _error(header)


def test_unknown_algorithm_is_parsed_but_not_replayed() -> None:
    header = pcr_event(0, EV_NO_ACTION, bytes(20), spec_id_data([(SHA256, 32), (0x00FE, 16)]))
    event = (
        struct.pack("<III", 4, EV_EFI_ACTION, 2)
        + struct.pack("<H", SHA256)
        + hashlib.sha256(b"x").digest()
        + struct.pack("<H", 0x00FE)
        + bytes(16)
        + struct.pack("<I", 1)
        + b"x"
    )
    log = parse_event_log(header + event)
    assert log.events[1].digests["alg_0x00fe"] == bytes(16)
    assert log.replayable_banks == ("sha256",)
    assert [f.kind for f in log.findings] == ["bank-unsupported"]


def test_extending_a_pcr_beyond_23_is_rejected() -> None:
    header = spec_id_event(["sha256"])
    assert "event extends PCR 24" in _error(header + measured(24, EV_EFI_ACTION, b"", ["sha256"]))


def test_too_many_events() -> None:
    event = pcr_event(4, EV_NO_ACTION, bytes(20), b"")
    message = _error(event * (MAX_EVENTS + 1))
    assert message == f"offset {MAX_EVENTS * len(event)}: more than {MAX_EVENTS} events"


def test_log_over_the_size_limit() -> None:
    assert "over the" in _error(bytes(MAX_LOG_BYTES + 1))


@pytest.mark.parametrize("data", [b"", bytes(64), b"\xff" * 64])
def test_empty_or_all_padding_log(data: bytes) -> None:
    assert _error(data).startswith("offset 0:")


def test_input_that_is_not_bytes() -> None:
    with pytest.raises(EventLogError, match="must be bytes, not str"):
        parse_event_log("not bytes")  # type: ignore[arg-type]


def test_trailing_padding_is_accepted_and_reported() -> None:
    data = real_log("event-bootorder.bin")
    for fill in (b"\x00", b"\xff"):
        log = parse_event_log(data + fill * 4096)
        assert log.padding_bytes == 4096
        assert log.replay() == expected_pcrs("event-bootorder.bin")
        assert [f.kind for f in log.findings] == ["padding"]


def test_trailing_garbage_is_an_error() -> None:
    data = real_log("event-bootorder.bin")
    assert _error(data + b"\x01\x02\x03").startswith(f"offset {len(data)}:")


def _length_fields(name: str) -> list[int]:
    """Offsets of every count and length field in a real log."""
    log = parse_event_log(real_log(name))
    if log.format == "sha1":
        return [event.offset + 28 for event in log.events]
    offsets = [28]  # the Spec ID event's data size
    for event, following in zip(log.events[1:], [*log.events[2:], None], strict=True):
        end = following.offset if following else len(real_log(name))
        offsets += [event.offset + 8, end - len(event.data) - 4]
    return offsets


@pytest.mark.parametrize("value", [0xFFFFFFFF, MAX_EVENT_DATA_BYTES])
def test_inflated_length_fields_fail_without_allocating(value: int) -> None:
    data = real_log("event-arch-linux.bin")
    for offset in _length_fields("event-arch-linux.bin"):
        mutated = data[:offset] + struct.pack("<I", value) + data[offset + 4 :]
        tracemalloc.start()
        try:
            with pytest.raises(EventLogError, match=r"^offset \d+: "):
                parse_event_log(mutated)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 * len(data) + 1024 * 1024, f"field at {offset}"


# --- Fuzzing: only EventLogError, and a parsed log can always be replayed and printed ---


def _parse_or_reject(data: bytes) -> None:
    try:
        log = parse_event_log(data)
    except EventLogError as error:
        assert re.match(r"^offset \d+: ", str(error)), str(error)
        return
    log.replay()
    json.dumps(log.to_dict())


@fuzz(1000)
@given(st.binary(max_size=4096))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _parse_or_reject(data)


@fuzz(800)
@given(
    st.lists(st.sampled_from(["sha1", "sha256", "sha384", "sha512", "sm3_256"]), unique=True),
    st.binary(max_size=2048),
)
def test_fuzz_bytes_after_a_valid_header(banks: list[str], body: bytes) -> None:
    _parse_or_reject(spec_id_event(banks or ["sha256"]) + body)


_REAL_LOG_BYTES = {name: real_log(name) for name in REAL_LOGS}


@fuzz(600)
@given(st.sampled_from(REAL_LOGS), MUTATIONS)
def test_fuzz_mutated_real_logs(name: str, mutations: list[tuple[str, int, int]]) -> None:
    _parse_or_reject(mutate(_REAL_LOG_BYTES[name], mutations))


@fuzz(100)
@given(st.integers(0, 2**64))
def test_fuzz_mutated_real_logs_in_bulk(seed: int) -> None:
    # 20 mutated logs per example: a failure reports the seed, and the mutation list below.
    for round_seed in range(seed, seed + 20):
        name = REAL_LOGS[round_seed % len(REAL_LOGS)]
        mutations = random_mutations(round_seed)
        try:
            _parse_or_reject(mutate(_REAL_LOG_BYTES[name], mutations))
        except Exception as error:
            error.add_note(f"log {name}, mutations {mutations}")
            raise


_LENGTH_FIELDS = {
    name: _length_fields(name)
    for name in ["event-arch-linux.bin", "event-uefi-sha1-log.bin", "event-postcode.bin"]
}


@fuzz(600)
@given(
    st.sampled_from(sorted(_LENGTH_FIELDS)),
    st.integers(0, 2**16),
    st.integers(0, 2**32 - 1) | st.sampled_from([MAX_EVENT_DATA_BYTES, MAX_EVENT_DATA_BYTES + 1]),
)
def test_fuzz_inflated_length_fields(name: str, which: int, value: int) -> None:
    raw = _REAL_LOG_BYTES[name]
    fields = _LENGTH_FIELDS[name]
    offset = fields[which % len(fields)]
    _parse_or_reject(raw[:offset] + struct.pack("<I", value) + raw[offset + 4 :])


def test_events_are_immutable_values() -> None:
    event = parse_event_log(real_log("event-uefivar.bin")).events[1]
    assert isinstance(event, Event)
    with pytest.raises(AttributeError):
        event.pcr = 3  # type: ignore[misc]
