"""IMA lists as real kernels write them beyond the defaults: per-bank lists (Linux 6.10), the
less common templates, violations in every template and bank, boot_aggregate variants; and the
parser's fast path checked against an independent reference parser on hostile input.

The lists are built with the kernel model of test_ima.py (itself checked against real lines).
"""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.attest.logs.eventlog import parse_event_log
from agent.attest.logs.ima import (
    ImaLog,
    bank_of_list,
    boot_aggregate,
    boot_aggregate_of,
    parse_ima_ascii,
    parse_ima_binary,
    read_ima_log,
)
from agent.attest.tpm.algorithms import BANKS, initial_pcr_value
from agent.errors import ImaLogError
from tests.attest_logs.test_ima import (
    BANK_SIZES,
    Measurement,
    comparable,
    d_ng,
    expected_pcr,
    ima_ng,
    sample_measurements,
    sha1,
    violation,
)
from tests.fuzzing import MUTATIONS, fuzz, mutate, random_mutations

TESTDATA = Path(__file__).resolve().parents[2].parent / "shared/testdata/eventlogs/tpm2-tools"

# Field IDs of the templates built here (ima_template.c); the model prints them like this.
VARIANT_FIELDS = {
    "ima": ("d", "n"),
    "ima-ng": ("d-ng", "n-ng"),
    "ima-sig": ("d-ng", "n-ng", "sig"),
    "ima-buf": ("d-ng", "n-ng", "buf"),
    "ima-ngv2": ("d-ngv2", "n-ng"),
    "ima-sigv2": ("d-ngv2", "n-ng", "sig"),
    "ima-modsig": ("d-ng", "n-ng", "sig", "d-modsig", "modsig"),
    "evm-sig": (
        "d-ng", "n-ng", "evmsig", "xattrnames", "xattrlengths", "xattrvalues", "iuid", "igid",
        "imode",
    ),
    "d-ng|n-ng": ("d-ng", "n-ng"),
}  # fmt: skip


def listed_hash(m: Measurement, bank: str) -> bytes:
    """The template-hash column of ``bank``'s list (all zero for a violation)."""
    if m.violation:
        return bytes(BANK_SIZES[bank])
    return hashlib.new(bank, m.hash_input()).digest()


def binary_list(measurements: list[Measurement], bank: str = "sha1") -> bytes:
    """``binary_runtime_measurements[_<bank>]``: the model's entries with ``bank``'s hashes."""
    return b"".join(
        struct.pack("<I", m.pcr) + listed_hash(m, bank) + m.binary()[24:] for m in measurements
    )


def ascii_line(m: Measurement, bank: str = "sha1") -> bytes:
    """How ima_ascii_measurements_show prints an entry (ima_template_lib.c show functions)."""
    line = b"%2d %s %s" % (m.pcr, listed_hash(m, bank).hex().encode(), m.template.encode())
    for field_id, data in zip(VARIANT_FIELDS[m.template], m.fields, strict=True):
        line += b" "
        if not data:
            continue
        if field_id in ("n", "n-ng", "xattrnames"):
            line += data.rstrip(b"\x00")
        elif field_id in ("d-ng", "d-ngv2", "d-modsig"):
            prefix, digest = data.split(b"\x00", 1)
            line += prefix + digest.hex().encode()
        elif field_id in ("iuid", "igid", "imode"):
            line += b"%d" % int.from_bytes(data, "little")
        else:
            line += data.hex().encode()
    return line + b"\n"


def ascii_list(measurements: list[Measurement], bank: str = "sha1") -> bytes:
    return b"".join(ascii_line(m, bank) for m in measurements)


def d_ngv2(kind: str, algorithm: str, digest: bytes) -> bytes:
    return f"{kind}:{algorithm}:".encode() + b"\x00" + digest


def variants() -> list[Measurement]:
    """One entry of every template a kernel may list, and violations of several."""
    signature = b"\x03\x02\x04" + bytes(range(40))
    return [
        Measurement("ima-ng", (d_ng("sha256", bytes(32)), b"boot_aggregate\x00")),
        Measurement("ima-ngv2", (d_ngv2("ima", "sha256", b"\x11" * 32), b"/usr/bin/a\x00")),
        Measurement("ima-ngv2", (d_ngv2("verity", "sha256", b"\x22" * 32), b"/usr/bin/b\x00")),
        Measurement(
            "ima-sigv2", (d_ngv2("ima", "sha512", b"\x33" * 64), b"/usr/bin/c\x00", signature)
        ),
        # ima-modsig: a kernel module with an appended signature, and a file without one.
        Measurement(
            "ima-modsig",
            (
                d_ng("sha256", b"\x44" * 32),
                b"/lib/modules/m.ko\x00",
                b"",
                d_ng("sha256", b"\x55" * 32),
                b"\x30\x82" + bytes(60),
            ),
        ),
        Measurement("ima-modsig", (d_ng("sha256", b"\x66" * 32), b"/usr/bin/d\x00", b"", b"", b"")),
        Measurement(
            "evm-sig",
            (
                d_ng("sha256", b"\x77" * 32),
                b"/etc/passwd\x00",
                b"\x05\x02" + bytes(10),
                b"security.ima|security.evm\x00",
                b"\x02\x00\x00\x00\x03\x00\x00\x00",
                b"ab" + b"cde",
                struct.pack("<I", 0),
                struct.pack("<I", 0),
                struct.pack("<H", 0o100644),
            ),
        ),
        Measurement(
            "ima-buf", (d_ng("sha256", hashlib.sha256(b"k").digest()), b"kexec-cmdline\x00", b"k")
        ),
        Measurement("ima", (bytes(20), b"/var/log/x\x00"), violation=True),
        violation(b"/etc/shadow"),
        Measurement(
            "ima-sig", (d_ng("sha1", bytes(20)), b"/tmp/f\x00", b""), pcr=11, violation=True
        ),
    ]


# --- Per-bank lists (Linux 6.10: binary_runtime_measurements_<algo>) ---


@pytest.mark.parametrize("listed", ["sha1", "sha256", "sha384", "sha512"])
@pytest.mark.parametrize("source", ["binary", "ascii"])
def test_per_bank_lists_replay_in_every_bank(listed: str, source: str) -> None:
    measurements = sample_measurements() + variants()
    rebuildable = [m for m in measurements if m.template != "evm-sig" or source == "binary"]
    if source == "binary":
        log = parse_ima_binary(binary_list(rebuildable, listed), template_hash_bank=listed)
    else:
        log = parse_ima_ascii(ascii_list(rebuildable, listed), template_hash_bank=listed)
    assert log.template_hash_bank == listed
    assert {e.template_hash_bank for e in log.entries} == {listed}
    assert log.violations == sum(m.violation for m in rebuildable)
    for bank in BANK_SIZES:
        for pcr in (10, 11):
            assert log.replay(bank, pcr=pcr) == expected_pcr(rebuildable, bank, pcr)


def test_the_lists_own_bank_folds_the_listed_hashes() -> None:
    # The kernel extends a bank with exactly what its list shows: replaying the list's own bank
    # must fold the column, never recompute it; other banks are recomputed from the data.
    measurements = [ima_ng(b"/a"), ima_ng(b"/b")]
    data = bytearray(binary_list(measurements, "sha256"))
    data[4:36] = b"\x99" * 32  # a hash the data does not give
    log = parse_ima_binary(bytes(data), template_hash_bank="sha256", verify_template_hashes=False)
    second = listed_hash(measurements[1], "sha256")
    value = hashlib.sha256(hashlib.sha256(bytes(32) + b"\x99" * 32).digest() + second).digest()
    assert log.replay("sha256") == value
    assert log.replay("sha1") == expected_pcr(measurements, "sha1")
    (bad, computed) = log.template_hash_mismatches()[0]
    assert (bad.index, computed) == (0, listed_hash(measurements[0], "sha256"))
    with pytest.raises(ImaLogError, match=r"^entry 0: template hash mismatch"):
        parse_ima_binary(bytes(data), template_hash_bank="sha256")


def test_a_per_bank_list_read_as_sha1_fails_on_its_first_entry() -> None:
    data = binary_list([ima_ng(b"/a")], "sha256")
    with pytest.raises(ImaLogError, match=r"^entry 0 \(offset 0\): .*20-byte template hashes"):
        parse_ima_binary(data)


@pytest.mark.parametrize(
    ("name", "bank"),
    [
        ("binary_runtime_measurements", "sha1"),
        ("ascii_runtime_measurements", "sha1"),
        ("binary_runtime_measurements_sha1", "sha1"),
        ("binary_runtime_measurements_sha256", "sha256"),
        ("ascii_runtime_measurements_sha384", "sha384"),
        ("binary_runtime_measurements_sha512", "sha512"),
        ("binary_runtime_measurements_sm3", "sm3_256"),
        ("ascii_runtime_measurements_sha3-256", "sha3_256"),
        ("binary_runtime_measurements_sha3_384", "sha3_384"),
        ("binary_runtime_measurements_tpm_alg_b", "sha256"),
        ("list.bin", "sha1"),
    ],
)
def test_the_bank_of_a_list_comes_from_its_name(name: str, bank: str) -> None:
    assert bank_of_list(name) == bank


@pytest.mark.parametrize("suffix", ["md5", "sha224", "tpm_alg_zz", "tpm_alg_ffff", ""])
def test_a_list_name_of_no_known_bank_is_refused(suffix: str) -> None:
    with pytest.raises(ImaLogError, match=r"cannot tell the bank of .* name the bank explicitly"):
        bank_of_list(f"binary_runtime_measurements_{suffix}")


@pytest.mark.parametrize("bank", ["sha256", "sha384"])
def test_read_ima_log_takes_the_bank_from_the_name_or_the_caller(tmp_path: Path, bank: str) -> None:
    measurements = variants()
    path = tmp_path / f"binary_runtime_measurements_{bank}"
    path.write_bytes(binary_list(measurements, bank))
    assert read_ima_log(path).replay("sha512") == expected_pcr(measurements, "sha512")
    other = tmp_path / "copy.bin"
    other.write_bytes(path.read_bytes())
    log = read_ima_log(other, template_hash_bank=bank)  # binary, from its first byte
    assert (log.source_format, log.template_hash_bank) == ("binary", bank)
    text = tmp_path / "copy.txt"
    text.write_bytes(ascii_list(measurements[:6], bank))
    assert read_ima_log(text, template_hash_bank=bank).source_format == "ascii"
    with pytest.raises(ImaLogError, match="unknown hash bank 'md5'"):
        read_ima_log(other, template_hash_bank="md5")


def test_legacy_padded_replay_of_a_per_bank_list() -> None:
    # Pre-5.8 kernels (and banks the kernel cannot hash) extend the SHA-1 template hash,
    # zero-padded; from a sha256 list it is recomputed from the template data.
    measurements = [ima_ng(b"/a"), violation(b"/b"), variants()[6]]
    log = parse_ima_binary(binary_list(measurements, "sha256"), template_hash_bank="sha256")
    value = bytes(48)
    for m in measurements:
        padded = (b"\xff" * 20 if m.violation else m.template_hash("sha1")) + bytes(28)
        value = hashlib.sha384(value + padded).digest()
    assert log.replay("sha384", legacy_padded_sha1=True) == value
    assert log.replay("sha1", legacy_padded_sha1=True) == expected_pcr(measurements, "sha1")


# --- Templates beyond ima-ng ---


@pytest.mark.parametrize("bank", ["sha1", "sha256"])
def test_every_template_parses_alike_from_both_formats(bank: str) -> None:
    measurements = [m for m in variants() if m.template != "evm-sig"]
    from_binary = parse_ima_binary(binary_list(measurements, bank), template_hash_bank=bank)
    from_ascii = parse_ima_ascii(ascii_list(measurements, bank), template_hash_bank=bank)
    assert [comparable(e) for e in from_binary.entries] == [
        comparable(e) for e in from_ascii.entries
    ]
    assert from_binary == parse_ima_binary(binary_list(measurements, bank), template_hash_bank=bank)


def test_d_ngv2_digests_keep_their_type() -> None:
    log = parse_ima_binary(binary_list(variants()))
    assert log.entries[1].file_digest == ("ima:sha256", b"\x11" * 32)
    assert log.entries[2].file_digest == ("verity:sha256", b"\x22" * 32)
    assert log.entries[3].signature == b"\x03\x02\x04" + bytes(range(40))


def test_ima_modsig_with_and_without_an_appended_signature() -> None:
    log = parse_ima_binary(binary_list(variants()))
    signed, unsigned = log.entries[4], log.entries[5]
    assert signed.modsig == (("sha256", b"\x55" * 32), b"\x30\x82" + bytes(60))
    assert unsigned.modsig == (None, b"")
    document = signed.to_dict()
    assert document["modsig_digest"] == "sha256:" + "55" * 32
    assert document["modsig"] == "3082" + "00" * 60
    assert "modsig" not in unsigned.to_dict()
    # The kernel prints nothing for the three empty fields: the line ends in three spaces.
    assert ascii_line(variants()[5]).endswith(b" /usr/bin/d   \n")


def test_evm_sig_replays_from_the_binary_list_only() -> None:
    entry = variants()[6]
    binary = parse_ima_binary(binary_list([entry]))
    assert binary.entries[0].file_name == "/etc/passwd"
    assert binary.replayable_banks() == tuple(BANKS)
    assert binary.replay("sha256") == expected_pcr([entry], "sha256")
    # iuid, igid and imode are printed as decimals: the ASCII line cannot give the data back,
    # so only its own bank replays.
    text = parse_ima_ascii(ascii_line(entry))
    assert not text.entries[0].template_data_known
    assert text.replayable_banks() == ("sha1",)
    assert text.replay("sha1") == expected_pcr([entry], "sha1")
    with pytest.raises(ImaLogError, match="cannot be rebuilt from the ASCII list"):
        text.replay("sha256")
    assert text.template_hash_mismatches() == []


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("bank", sorted(BANK_SIZES))
def test_violations_of_every_template_extend_all_ones(bank: str, legacy: bool) -> None:
    entries = [m for m in variants() if m.violation]
    log = parse_ima_binary(binary_list(entries))
    assert log.violations == 3
    assert all(not any(e.template_hash) for e in log.entries)
    size = BANK_SIZES[bank]
    ones = (b"\xff" * 20 + bytes(size))[:size] if legacy and bank != "sha1" else b"\xff" * size
    for pcr in (10, 11):
        value = bytes(size)
        for m in entries:
            if m.pcr == pcr:
                value = hashlib.new(bank, value + ones).digest()
        assert log.replay(bank, pcr=pcr, legacy_padded_sha1=legacy) == value


# --- boot_aggregate ---


def firmware_pcrs(bank: str) -> dict[int, bytes]:
    replayed = parse_event_log((TESTDATA / "event-gce-ubuntu-2104-log.bin").read_bytes()).replay()
    return {pcr: replayed[bank].get(pcr, initial_pcr_value(BANKS[bank], pcr)) for pcr in range(24)}


@pytest.mark.parametrize(
    ("template", "bank", "used"),
    [
        ("ima", "sha1", 8),
        ("ima-ng", "sha1", 8),
        ("ima-ng", "sha256", 10),
        ("ima-ngv2", "sha384", 10),
    ],
)
def test_boot_aggregate_variants(template: str, bank: str, used: int) -> None:
    # SHA-1 covers PCRs 0-7; any other bank 0-9 (Linux 5.8, "ima: extend boot_aggregate with
    # kernel measurements"). The `ima` template shows a bare digest, ima-ng "<algo>:",
    # ima-ngv2 "ima:<algo>:".
    pcrs = firmware_pcrs(bank)
    expected = hashlib.new(bank, b"".join(pcrs[pcr] for pcr in range(used))).digest()
    assert boot_aggregate(pcrs, bank) == expected
    if template == "ima":
        fields: tuple[bytes, ...] = (expected, b"boot_aggregate\x00")
    elif template == "ima-ng":
        fields = (d_ng(bank, expected), b"boot_aggregate\x00")
    else:
        fields = (d_ngv2("ima", bank, expected), b"boot_aggregate\x00")
    (entry,) = parse_ima_binary(binary_list([Measurement(template, fields)])).entries
    assert boot_aggregate_of(entry) == (bank, expected)


def test_boot_aggregate_without_a_tpm_and_of_other_entries() -> None:
    (no_tpm, other) = parse_ima_binary(binary_list(variants()[:2])).entries
    assert boot_aggregate_of(no_tpm) == ("sha256", bytes(32))
    assert boot_aggregate_of(other) is None
    with pytest.raises(ImaLogError, match="boot_aggregate in sha256 needs PCR 8"):
        boot_aggregate({pcr: bytes(32) for pcr in range(8)}, "sha256")


# --- The fast path against an independent reference parser ---

_NAME = re.compile(rb"[A-Za-z0-9_|.-]+")
FIELD_IDS = {field for fields in VARIANT_FIELDS.values() for field in fields}


def reference_parse(data: bytes) -> list[tuple[object, ...]] | int:
    """A straightforward reading of the binary list (ima_fs.c) with the parser's bounds: the
    entries (as test_ima.comparable without the index), or the index of the first bad entry."""
    entries: list[tuple[object, ...]] = []
    offset = 0

    def u32(at: int) -> int | None:
        return struct.unpack_from("<I", data, at)[0] if at + 4 <= len(data) else None

    while offset < len(data):
        index = len(entries)
        pcr, name_size = u32(offset), u32(offset + 24)
        if pcr is None or name_size is None or pcr > 23 or name_size > 255:
            return index
        template_hash = data[offset + 4 : offset + 24]
        name = data[offset + 28 : offset + 28 + name_size]
        at = offset + 28 + name_size
        if at > len(data) or not _NAME.fullmatch(name):
            return index
        if name == b"ima":
            digest, size = data[at : at + 20], u32(at + 20)
            if size is None or size > 255 or at + 24 + size > len(data):
                return index
            file_name = data[at + 24 : at + 24 + size] + b"\x00"
            fields: tuple[bytes, ...] = (digest, file_name)
            hashed = digest + file_name.ljust(256, b"\x00")
            offset = at + 24 + size
        else:
            size = u32(at)
            if size is None or size > 1024 * 1024 or at + 4 + size > len(data):
                return index
            hashed = data[at + 4 : at + 4 + size]
            parts: list[bytes] = []
            cursor = 0
            while cursor < size:
                length = u32(at + 4 + cursor)
                if length is None or cursor + 4 + length > size or len(parts) == 15:
                    return index
                parts.append(hashed[cursor + 4 : cursor + 4 + length])
                cursor += 4 + length
            if cursor != size:
                return index
            fields = tuple(parts)
            # A built-in template, or a custom format of known field IDs ("d-ng|n-ng|sig"),
            # fixes the field count; any other template name does not.
            known = VARIANT_FIELDS.get(name.decode()) or tuple(name.decode().split("|"))
            if set(known) <= FIELD_IDS and len(known) <= 15 and len(known) != len(fields):
                return index
            offset = at + 4 + size
        if any(template_hash) and sha1(hashed).digest() != template_hash:
            return index
        entries.append((pcr, template_hash, name.decode(), fields))
    return entries


def check_against_reference(data: bytes) -> None:
    expected = reference_parse(data)
    try:
        log = parse_ima_binary(data)
    except ImaLogError as error:
        assert isinstance(expected, int), f"the reference accepts what the parser refuses: {error}"
        assert str(error).startswith(f"entry {expected}"), (expected, str(error))
        return
    assert isinstance(expected, list), f"the parser accepts what the reference refuses ({expected})"
    assert [comparable(e)[1:] for e in log.entries] == [
        (pcr, template_hash, name, fields, log.entries[i].field_ids)
        for i, (pcr, template_hash, name, fields) in enumerate(expected)
    ]


_BUILT = binary_list((sample_measurements() + variants()) * 2)


def test_the_reference_parser_reads_the_built_list() -> None:
    check_against_reference(_BUILT)
    assert isinstance(reference_parse(_BUILT), list)
    assert isinstance(parse_ima_binary(_BUILT), ImaLog)


@fuzz(600)
@given(MUTATIONS)
def test_fuzz_fast_path_agrees_with_the_reference(mutations: list[tuple[str, int, int]]) -> None:
    check_against_reference(mutate(_BUILT, mutations))


@fuzz(100)
@given(st.integers(0, 2**64))
def test_fuzz_fast_path_agrees_with_the_reference_in_bulk(seed: int) -> None:
    for round_seed in range(seed, seed + 20):
        mutations = random_mutations(round_seed)
        try:
            check_against_reference(mutate(_BUILT, mutations))
        except AssertionError as error:
            error.add_note(f"mutations {mutations}")
            raise


@fuzz(300)
@given(st.binary(max_size=512), st.integers(0, len(_BUILT)))
def test_fuzz_bytes_spliced_into_a_valid_list(chunk: bytes, where: int) -> None:
    check_against_reference(_BUILT[:where] + chunk + _BUILT[where:])
