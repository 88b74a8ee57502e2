"""IMA measurement list parsers, template-hash checks and PCR 10 replay.

The tests build lists the way the kernel writes them (security/integrity/ima/ima_fs.c and
ima_template_lib.c) with a small model below, independent of the parser. The model itself is
checked against real list lines published by the kernel's IMA maintainers (linux-ima wiki) and
on the linux-integrity mailing list, whose template hashes it must reproduce.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.attest.logs.ima import (
    MAX_TEMPLATE_DATA_BYTES,
    ImaEntry,
    parse_ima_ascii,
    parse_ima_binary,
    read_ima_log,
    replay,
)
from agent.errors import ImaLogError
from tests.fuzzing import MUTATIONS, fuzz, mutate, random_mutations

BANK_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
SYSFS_IMA = Path("/sys/kernel/security/ima")

# Real lines: the linux-ima wiki ("ima" template), LKML posts (ima-sig with and without a
# signature, ima-buf, ima-ng violation-free boot_aggregate).
REAL_ASCII_LINES = [
    b"10 7971593a7ad22a7cce5b234e4bc5d71b04696af4 ima b5a166c10d153b7cc3e5b4f1eab1f71672b7c524 "
    b"boot_aggregate",
    b"10 2c7020ad8cab6b7419e4973171cb704bdbf52f77 ima e09e048c48301268ff38645f4c006137e42951d0 "
    b"/init",
    b"10 0c8a706a75a5689c1e168f0a573a3cbec33061b5 ima-sig sha256:e4cb9f5709c88376b5fc3743cd88e7"
    b"6b9aae8f3d992d845678de5215edb31216 boot_aggregate ",
    b"10 06e804489a77ddab51b9ef27e17053c0e5d503bd ima-sig sha1:1cb84b12db45d7da8de58ba6744187db8"
    b"4082f0e /usr/bin/zmore 030202531f402500483046022100bff9c02dc7b270c83cc94bfec10eecd42831de2"
    b"cdcb04f024369a14623bc3a91022100cc4d015ae932fb98d6846645ed7d1bb1afd4621ec9089bc087126f19188"
    b"6dd31",
    b"10 49ab61dd97ea2f759edcb6c6a3387ac67f0aa576 ima-buf sha256:0c907aab3261194f16b0c2a422a82f1"
    b"45bc9b9ecb8fdb633fa43e3e5379f0af2 kernel_version 372e312e302d7263312b",
    b"10 0adefe762c149c7cec19da62f0da1297fcfbffff ima-ng sha256:00000000000000000000000000000000"
    b"00000000000000000000000000000000 boot_aggregate",
    b"11 50b5a68bea0776a84eef6725f17ce474756e51c0 ima-ng sha256:15e1efee080fe54f5d7404af7e913de0"
    b"1671e745ce55215d89f3d6521d3884f0 /root/cat",
]


# --- A model of what the kernel stores, hashes and prints ---

FIELDS = {
    "ima": ("d", "n"),
    "ima-ng": ("d-ng", "n-ng"),
    "ima-sig": ("d-ng", "n-ng", "sig"),
    "ima-buf": ("d-ng", "n-ng", "buf"),
    "d-ng|n-ng": ("d-ng", "n-ng"),
}


@dataclass(frozen=True)
class Measurement:
    template: str
    fields: tuple[bytes, ...]  # kernel field data; strings end in NUL
    pcr: int = 10
    violation: bool = False

    def hash_input(self) -> bytes:
        if self.template == "ima":
            digest, name = self.fields
            return digest + name.ljust(256, b"\x00")
        return b"".join(struct.pack("<I", len(f)) + f for f in self.fields)

    def template_hash(self, bank: str = "sha1") -> bytes:
        if self.violation:
            return bytes(BANK_SIZES[bank])
        return hashlib.new(bank, self.hash_input()).digest()

    def extended(self, bank: str) -> bytes:
        if self.violation:
            return b"\xff" * BANK_SIZES[bank]
        return hashlib.new(bank, self.hash_input()).digest()

    def binary(self) -> bytes:
        head = struct.pack("<I", self.pcr) + self.template_hash()
        head += struct.pack("<I", len(self.template)) + self.template.encode()
        if self.template == "ima":
            digest, name = self.fields
            return head + digest + struct.pack("<I", len(name) - 1) + name[:-1]
        return head + struct.pack("<I", len(self.hash_input())) + self.hash_input()

    def ascii(self) -> bytes:
        line = b"%2d %s %s" % (
            self.pcr,
            self.template_hash().hex().encode(),
            self.template.encode(),
        )
        for field_id, data in zip(FIELDS[self.template], self.fields, strict=True):
            line += b" "
            if not data:
                continue
            if field_id in ("n", "n-ng"):
                line += data[:-1]
            elif field_id == "d-ng":
                prefix, digest = data.split(b"\x00", 1)
                line += prefix + digest.hex().encode()
            else:
                line += data.hex().encode()
        return line + b"\n"


def sha1(data: bytes) -> hashlib._Hash:
    # SHA-1 is the IMA template hash and a TPM PCR bank: what the kernel uses, not our choice.
    return hashlib.sha1(data)  # noqa: S324


def d_ng(algorithm: str, digest: bytes) -> bytes:
    return algorithm.encode() + b":\x00" + digest


def ima_ng(name: bytes, content: bytes = b"", *, algorithm: str = "sha256") -> Measurement:
    digest = hashlib.new(algorithm, content or name).digest()
    return Measurement("ima-ng", (d_ng(algorithm, digest), name + b"\x00"))


def violation(name: bytes) -> Measurement:
    return Measurement("ima-ng", (d_ng("sha256", bytes(32)), name + b"\x00"), violation=True)


def sample_measurements() -> list[Measurement]:
    return [
        Measurement("ima", (sha1(b"agg").digest(), b"boot_aggregate\x00")),
        ima_ng(b"/usr/bin/bash"),
        ima_ng(b"/usr/lib/libc.so.6", algorithm="sha512"),
        Measurement(
            "ima-sig",
            (d_ng("sha256", hashlib.sha256(b"x").digest()), b"/usr/bin/ls\x00", b"\x03\x02\x04sig"),
        ),
        Measurement(
            "ima-sig", (d_ng("sha256", hashlib.sha256(b"y").digest()), b"/bin/cat\x00", b"")
        ),
        violation(b"/etc/shadow"),
        Measurement(
            "ima-buf",
            (d_ng("sha256", hashlib.sha256(b"7.1.0").digest()), b"kernel_version\x00", b"7.1.0"),
        ),
        Measurement("d-ng|n-ng", (d_ng("sha256", bytes(range(32))), b"/custom\x00")),
        Measurement("ima-ng", (d_ng("sha256", bytes(32)), b"/sbin/init\x00"), pcr=11),
    ]


def expected_pcr(measurements: list[Measurement], bank: str, pcr: int = 10) -> bytes:
    value = bytes(BANK_SIZES[bank])
    for measurement in measurements:
        if measurement.pcr == pcr:
            value = hashlib.new(bank, value + measurement.extended(bank)).digest()
    return value


def binary_log(measurements: list[Measurement]) -> bytes:
    return b"".join(m.binary() for m in measurements)


def ascii_log(measurements: list[Measurement]) -> bytes:
    return b"".join(m.ascii() for m in measurements)


def comparable(entry: ImaEntry) -> tuple[object, ...]:
    return (
        entry.index,
        entry.pcr,
        entry.template_hash,
        entry.template_name,
        entry.fields,
        entry.field_ids,
    )


# --- Real lines ---


def test_real_ascii_lines_verify() -> None:
    log = parse_ima_ascii(b"\n".join(REAL_ASCII_LINES) + b"\n")
    assert [e.template_name for e in log.entries] == [
        "ima",
        "ima",
        "ima-sig",
        "ima-sig",
        "ima-buf",
        "ima-ng",
        "ima-ng",
    ]
    assert log.entries[3].file_name == "/usr/bin/zmore"
    assert log.entries[3].file_digest == (
        "sha1",
        bytes.fromhex("1cb84b12db45d7da8de58ba6744187db84082f0e"),
    )
    assert log.entries[3].signature is not None
    assert log.entries[2].signature == b""
    assert log.entries[4].buffer == b"7.1.0-rc1+"
    assert log.entries[6].pcr == 11
    assert log.violations == 0


def test_the_model_reproduces_the_real_template_hashes() -> None:
    for line in REAL_ASCII_LINES:
        (entry,) = parse_ima_ascii(line).entries
        model = Measurement(entry.template_name, entry.fields, entry.pcr)
        assert model.template_hash() == entry.template_hash
        assert model.ascii() == line + b"\n"
        (from_binary,) = parse_ima_binary(model.binary()).entries
        assert comparable(from_binary) == comparable(entry)


@pytest.mark.parametrize("position", [60, 140])
def test_tampered_real_line_fails_the_template_hash_check(position: int) -> None:
    line = bytearray(REAL_ASCII_LINES[3])
    line[position] = ord("0") if line[position] != ord("0") else ord("1")
    lines = b"\n".join([REAL_ASCII_LINES[0], bytes(line)])
    with pytest.raises(ImaLogError, match=r"^entry 1: template hash mismatch: the list says"):
        parse_ima_ascii(lines)
    log = parse_ima_ascii(lines, verify_template_hashes=False)
    assert len(log.entries) == 2


# --- Built lists: every template, violations, both formats ---


def test_binary_and_ascii_lists_parse_to_the_same_entries() -> None:
    measurements = sample_measurements()
    from_binary = parse_ima_binary(binary_log(measurements))
    from_ascii = parse_ima_ascii(ascii_log(measurements))
    assert [comparable(e) for e in from_binary.entries] == [
        comparable(e) for e in from_ascii.entries
    ]
    assert from_binary.violations == 1
    assert from_binary.pcrs == {10, 11}


@pytest.mark.parametrize("bank", sorted(BANK_SIZES))
@pytest.mark.parametrize("source", ["binary", "ascii"])
def test_replay_matches_the_kernel_model_in_every_bank(bank: str, source: str) -> None:
    measurements = sample_measurements()
    if source == "binary":
        log = parse_ima_binary(binary_log(measurements))
    else:
        log = parse_ima_ascii(ascii_log(measurements))
    assert log.replay(bank) == expected_pcr(measurements, bank)
    assert log.replay(bank, pcr=11) == expected_pcr(measurements, bank, pcr=11)


def test_violation_extends_all_ones() -> None:
    log = parse_ima_binary(binary_log([violation(b"/etc/shadow")]))
    (entry,) = log.entries
    assert entry.violation
    assert entry.template_hash == bytes(20)
    assert log.replay("sha1") == sha1(bytes(20) + b"\xff" * 20).digest()
    assert log.replay("sha256") == hashlib.sha256(bytes(32) + b"\xff" * 32).digest()


def test_legacy_kernels_extend_padded_sha1() -> None:
    measurements = [ima_ng(b"/a"), violation(b"/b"), ima_ng(b"/c")]
    log = parse_ima_binary(binary_log(measurements))
    value = bytes(32)
    for m in measurements:
        sha1 = b"\xff" * 20 if m.violation else m.template_hash()
        value = hashlib.sha256(value + sha1 + bytes(12)).digest()
    assert log.replay("sha256", legacy_padded_sha1=True) == value
    assert log.replay("sha1", legacy_padded_sha1=True) == expected_pcr(measurements, "sha1")


def test_incremental_replay_equals_full_replay() -> None:
    measurements = sample_measurements() * 3
    full = binary_log(measurements)
    for split in (0, 1, 7, len(measurements)):
        head = binary_log(measurements[:split])
        tail = parse_ima_binary(full[len(head) :], first_index=split)
        kept = replay(parse_ima_binary(head).entries, "sha256")
        assert replay(tail.entries, "sha256", start_index=split, starting_pcr=kept) == (
            expected_pcr(measurements, "sha256")
        )
        assert tail.replay("sha256", starting_pcr=kept) == expected_pcr(measurements, "sha256")
    whole = parse_ima_binary(full)
    kept = whole.replay("sha1", start_index=0)
    assert whole.replay("sha1", start_index=len(measurements), starting_pcr=kept) == kept


def test_entry_offsets_let_the_agent_ship_only_new_entries() -> None:
    measurements = sample_measurements()
    full = binary_log(measurements)
    log = parse_ima_binary(full)
    tail = parse_ima_binary(full[log.entries[4].offset :], first_index=4)
    assert [comparable(e) for e in tail.entries] == [comparable(e) for e in log.entries[4:]]


def test_replay_rejects_gaps_and_wrong_start_values() -> None:
    entries = parse_ima_binary(binary_log(sample_measurements())).entries
    with pytest.raises(ImaLogError, match=r"^entry 3: expected entry 2 next"):
        replay([entries[0], entries[1], entries[3]], "sha1")
    with pytest.raises(ImaLogError, match="expected entry 20 next"):
        replay(entries, "sha1", start_index=20)
    with pytest.raises(ImaLogError, match="starting PCR value is 20 bytes, a sha256 PCR is 32"):
        replay(entries, "sha256", starting_pcr=bytes(20))
    with pytest.raises(ImaLogError, match="unknown hash bank 'md5'"):
        replay(entries, "md5")


def test_custom_and_unknown_templates() -> None:
    unknown = b"10 " + b"ab" * 20 + b" my-template 1 2 3\n"
    log = parse_ima_ascii(unknown)
    (entry,) = log.entries
    assert not entry.template_data_known
    assert entry.fields == (b"1", b"2", b"3")
    assert log.replay("sha1") == sha1(bytes(20) + b"\xab" * 20).digest()
    with pytest.raises(ImaLogError, match=r"entry 0: .*use binary_runtime_measurements"):
        log.replay("sha256")
    # The binary list carries the data, so any template can be rehashed from it.
    fields = (b"one", b"two\x00")
    measurement = Measurement("my-template", fields)
    binary = parse_ima_binary(measurement.binary())
    assert binary.entries[0].fields == fields
    assert binary.replay("sha256") == expected_pcr([measurement], "sha256")


def test_single_digit_pcr_is_printed_with_a_leading_space() -> None:
    measurement = Measurement("ima-ng", ima_ng(b"/x").fields, pcr=9)
    assert measurement.ascii().startswith(b" 9 ")
    (entry,) = parse_ima_ascii(measurement.ascii()).entries
    assert entry.pcr == 9


def test_ima_sig_without_trailing_space_still_verifies() -> None:
    line = REAL_ASCII_LINES[2].rstrip(b" ")
    (entry,) = parse_ima_ascii(line).entries
    assert entry.signature == b""


def test_text_input_and_last_line_without_newline() -> None:
    text = ascii_log(sample_measurements()).decode()
    assert len(parse_ima_ascii(text.rstrip("\n")).entries) == len(sample_measurements())


def test_non_utf8_file_names_survive_both_formats() -> None:
    measurement = ima_ng(b"/tmp/\xff\xfe-latin1-\xe9")
    (from_ascii,) = parse_ima_ascii(measurement.ascii()).entries
    (from_binary,) = parse_ima_binary(measurement.binary()).entries
    assert from_ascii.fields == from_binary.fields
    assert from_ascii.file_name == "/tmp/\\xff\\xfe-latin1-\\xe9"


def test_to_dict_is_json() -> None:
    log = parse_ima_binary(binary_log(sample_measurements()))
    document = json.loads(json.dumps(log.to_dict()))
    assert document["violations"] == 1
    assert document["entries"][3]["signature"] == "03020473696" + "7"
    assert document["entries"][1]["file_digest"].startswith("sha256:")
    assert document["entries"][0]["file_name"] == "boot_aggregate"


# --- Malformed and hostile input ---


def binary_error(data: bytes) -> str:
    with pytest.raises(ImaLogError) as raised:
        parse_ima_binary(data)
    return str(raised.value)


def ascii_error(data: bytes) -> str:
    with pytest.raises(ImaLogError) as raised:
        parse_ima_ascii(data)
    return str(raised.value)


def test_truncated_binary_list_names_the_entry() -> None:
    data = binary_log(sample_measurements())
    offsets = [e.offset for e in parse_ima_binary(data).entries]
    message = binary_error(data[: offsets[3] + 30])
    assert re.match(rf"^entry 3 \(offset {offsets[3] + 28}\): template name needs 7 bytes", message)


def test_binary_length_fields_over_their_limits() -> None:
    head = struct.pack("<I", 10) + bytes(20)
    assert "template name length 4096 is over 255" in binary_error(head + struct.pack("<I", 4096))
    big = head + struct.pack("<I", 6) + b"ima-ng" + struct.pack("<I", MAX_TEMPLATE_DATA_BYTES + 1)
    assert f"template data length {MAX_TEMPLATE_DATA_BYTES + 1} is over" in binary_error(big)
    ima = head + struct.pack("<I", 3) + b"ima" + bytes(20) + struct.pack("<I", 256)
    assert "`ima` template file name length 256 is over 255" in binary_error(ima)


def test_binary_field_count_must_match_the_template() -> None:
    measurement = Measurement("ima-ng", (*ima_ng(b"/x").fields, b"extra"))
    assert "template ima-ng has 2 fields, the entry has 3" in binary_error(measurement.binary())


def test_binary_pcr_out_of_range() -> None:
    data = Measurement("ima-ng", ima_ng(b"/x").fields, pcr=24).binary()
    assert binary_error(data) == "entry 0: PCR 24 is out of range 0-23"


def test_binary_template_name_must_be_plain() -> None:
    head = struct.pack("<I", 10) + bytes(20)
    assert "template name" in binary_error(head + struct.pack("<I", 3) + b"a b")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"10 zz ima-ng sha256:00 /x", "template hash b'zz' is not 20 bytes of hex"),
        (b"1x " + b"00" * 20 + b" ima-ng sha256:00 /x", "PCR b'1x' is not a decimal number"),
        (b"10 " + b"00" * 20, "expected '<pcr> <template hash> <template name> <fields...>'"),
        (b"10 " + b"11" * 20 + b" ima-ng sha256:00 /x y", "3 fields, template ima-ng has 2"),
        (b"10 " + b"11" * 20 + b" ima-ng sha256:0g /x", "d-ng digest b'0g' is not hex"),
        (b"10 " + b"11" * 20 + b" ima-ng 00 /x", "has no '<algorithm>:' prefix"),
        (b"10 " + b"11" * 20 + b" ima-ng sha256:00 /x\x00y", "n-ng field contains a NUL byte"),
        (b"10 " + b"11" * 20 + b" ima 00 /x", "`ima` template digest must be 20 bytes"),
        (b"10 " + b"11" * 20 + b" ima " + b"00" * 20 + b" " + b"n" * 256, "file name is 256"),
        (b"99 " + b"11" * 20 + b" ima-ng sha256:00 /x", "PCR 99 is out of range 0-23"),
    ],
)
def test_malformed_ascii_lines(line: bytes, reason: str) -> None:
    good = ascii_log([ima_ng(b"/first")])
    message = ascii_error(good + line + b"\n")
    assert message.startswith("entry 1")
    assert reason in message


def test_blank_line_is_an_error() -> None:
    data = ascii_log([ima_ng(b"/a")]) + b"\n" + ascii_log([ima_ng(b"/b")])
    assert ascii_error(data).startswith("entry 1 (offset")


def test_text_that_cannot_be_bytes_and_negative_indices() -> None:
    with pytest.raises(ImaLogError, match="unpaired surrogate at character 3"):
        parse_ima_ascii("10 \ud800")
    with pytest.raises(ImaLogError, match="first_index must not be negative"):
        parse_ima_binary(b"", first_index=-1)


def test_inputs_of_the_wrong_type() -> None:
    with pytest.raises(ImaLogError, match="must be bytes or str, not int"):
        parse_ima_binary(3)  # type: ignore[arg-type]
    with pytest.raises(ImaLogError, match="must be bytes or str, not list"):
        parse_ima_ascii([])  # type: ignore[arg-type]


def test_read_ima_log_translates_os_errors(tmp_path: Path) -> None:
    with pytest.raises(ImaLogError, match="cannot read IMA measurement list"):
        read_ima_log(tmp_path / "binary_runtime_measurements")


def test_read_ima_log_picks_the_format_from_the_name(tmp_path: Path) -> None:
    measurements = sample_measurements()
    (tmp_path / "binary_runtime_measurements").write_bytes(binary_log(measurements))
    (tmp_path / "ascii_runtime_measurements").write_bytes(ascii_log(measurements))
    for name in ("binary_runtime_measurements", "ascii_runtime_measurements"):
        log = read_ima_log(tmp_path / name)
        assert log.replay("sha256") == expected_pcr(measurements, "sha256")


def test_per_bank_lists_carry_that_banks_template_hash(tmp_path: Path) -> None:
    # Linux 6.x also lists binary_runtime_measurements_<algo>, template hashes in that bank.
    measurements = [ima_ng(b"/a"), violation(b"/b"), sample_measurements()[0]]
    data = b""
    for m in measurements:
        head = struct.pack("<I", m.pcr) + m.template_hash("sha256")
        data += head + m.binary()[24:]
    path = tmp_path / "binary_runtime_measurements_sha256"
    path.write_bytes(data)
    log = read_ima_log(path)
    assert [e.template_hash_bank for e in log.entries] == ["sha256"] * 3
    assert log.entries[1].violation
    for bank in ("sha1", "sha256", "sha512"):
        assert log.replay(bank) == expected_pcr(measurements, bank)


@pytest.mark.parametrize("value", [0xFFFFFFFF, MAX_TEMPLATE_DATA_BYTES])
def test_inflated_binary_lengths_fail_without_allocating(value: int) -> None:
    data = binary_log(sample_measurements() * 20)
    log = parse_ima_binary(data)
    for entry in log.entries[:40]:
        name_length = entry.offset + 24
        for offset in (name_length, name_length + 4 + len(entry.template_name)):
            mutated = data[:offset] + struct.pack("<I", value) + data[offset + 4 :]
            tracemalloc.start()
            try:
                with pytest.raises(ImaLogError, match=r"^entry \d+"):
                    parse_ima_binary(mutated)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < 4 * len(data) + 1024 * 1024


# --- This machine's own list, where the kernel exposes one ---


@pytest.mark.skipif(
    not os.access(SYSFS_IMA / "binary_runtime_measurements", os.R_OK),
    reason="this kernel exposes no readable IMA measurement list (CONFIG_IMA off, securityfs "
    "not mounted, or not root)",
)
def test_this_machines_measurement_list() -> None:
    binary = read_ima_log(SYSFS_IMA / "binary_runtime_measurements")
    text = read_ima_log(SYSFS_IMA / "ascii_runtime_measurements")
    # Entries may be appended between the two reads; compare the common prefix.
    common = min(len(binary.entries), len(text.entries))
    assert common > 0
    assert binary.entries[0].file_name in ("boot_aggregate", None)
    for from_binary, from_text in zip(binary.entries[:common], text.entries[:common], strict=True):
        assert from_binary.template_hash == from_text.template_hash
    binary.replay("sha1")


# --- Fuzzing: only ImaLogError, whatever the bytes ---

file_names = st.binary(min_size=1, max_size=40).filter(
    lambda n: b" " not in n and b"\n" not in n and b"\x00" not in n
)


@st.composite
def measurements(draw: st.DrawFn) -> Measurement:
    template = draw(st.sampled_from(sorted(FIELDS)))
    name = draw(file_names) + b"\x00"
    algorithm = draw(st.sampled_from(["sha1", "sha256", "sha512"]))
    digest = d_ng(algorithm, hashlib.new(algorithm, name).digest())
    pcr = draw(st.sampled_from([10, 10, 10, 11, 9]))
    if template == "ima":
        if len(name) > 256:
            name = name[:255] + b"\x00"
        return Measurement("ima", (sha1(name).digest(), name), pcr)
    extra = tuple(draw(st.binary(max_size=32)) for _ in FIELDS[template][2:])
    if draw(st.integers(0, 9)) == 0:
        return Measurement(template, (d_ng("sha256", bytes(32)), name, *extra), pcr, True)
    return Measurement(template, (digest, name, *extra), pcr)


@fuzz(200)
@given(st.lists(measurements(), max_size=12), st.sampled_from(sorted(BANK_SIZES)))
def test_fuzz_valid_lists_replay_like_the_kernel(items: list[Measurement], bank: str) -> None:
    from_binary = parse_ima_binary(binary_log(items))
    from_ascii = parse_ima_ascii(ascii_log(items))
    assert [comparable(e) for e in from_binary.entries] == [
        comparable(e) for e in from_ascii.entries
    ]
    for pcr in (9, 10, 11):
        assert from_binary.replay(bank, pcr=pcr) == expected_pcr(items, bank, pcr)
        assert from_ascii.replay(bank, pcr=pcr) == expected_pcr(items, bank, pcr)


def _parse_binary_or_reject(data: bytes) -> None:
    try:
        log = parse_ima_binary(data)
    except ImaLogError as error:
        assert str(error).startswith("entry "), str(error)
        return
    for bank in ("sha1", "sha256"):
        log.replay(bank, pcr=10)
    json.dumps(log.to_dict())


def _parse_ascii_or_reject(data: bytes) -> None:
    try:
        log = parse_ima_ascii(data)
    except ImaLogError as error:
        assert str(error).startswith("entry "), str(error)
        return
    log.replay("sha1")
    try:
        log.replay("sha256")
    except ImaLogError as error:
        assert "use binary_runtime_measurements" in str(error)
    json.dumps(log.to_dict())


@fuzz(1000)
@given(st.binary(max_size=2048))
def test_fuzz_binary_arbitrary_bytes(data: bytes) -> None:
    _parse_binary_or_reject(data)


@fuzz(800)
@given(st.binary(max_size=2048))
def test_fuzz_ascii_arbitrary_bytes(data: bytes) -> None:
    _parse_ascii_or_reject(data)


@fuzz(300)
@given(st.text(max_size=300))
def test_fuzz_ascii_text(text: str) -> None:
    try:
        log = parse_ima_ascii(text)
    except ImaLogError as error:
        assert str(error).startswith("entry "), str(error)
        return
    json.dumps(log.to_dict())


@fuzz(600)
@given(
    st.lists(
        st.sampled_from([b"10", b" 9", b"ab" * 20, b"00" * 20, b"ima-ng", b"ima", b"ima-sig"])
        | st.sampled_from([b"sha256:" + b"00" * 32, b"sha1:", b":", b"/x", b"", b"d-ng|n-ng"])
        | st.binary(max_size=12),
        max_size=12,
    ).map(b" ".join),
)
def test_fuzz_ascii_line_shaped_input(line: bytes) -> None:
    _parse_ascii_or_reject(line + b"\n")


_BUILT_BINARY = binary_log(sample_measurements())
_BUILT_ASCII = ascii_log(sample_measurements())


@fuzz(600)
@given(MUTATIONS)
def test_fuzz_mutated_binary_lists(mutations: list[tuple[str, int, int]]) -> None:
    _parse_binary_or_reject(mutate(_BUILT_BINARY, mutations))


@fuzz(600)
@given(MUTATIONS)
def test_fuzz_mutated_ascii_lists(mutations: list[tuple[str, int, int]]) -> None:
    _parse_ascii_or_reject(mutate(_BUILT_ASCII, mutations))


@fuzz(100)
@given(st.integers(0, 2**64))
def test_fuzz_mutated_lists_in_bulk(seed: int) -> None:
    # 20 mutated lists of each format per example; a failure names the mutations.
    for round_seed in range(seed, seed + 20):
        mutations = random_mutations(round_seed)
        try:
            _parse_binary_or_reject(mutate(_BUILT_BINARY, mutations))
            _parse_ascii_or_reject(mutate(_BUILT_ASCII, mutations))
        except Exception as error:
            error.add_note(f"mutations {mutations}")
            raise
