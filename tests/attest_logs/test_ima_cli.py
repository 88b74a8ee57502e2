"""`accelguard attest ima FILE`, run as an operator runs it (``python -m agent.cli``).

Expected values come from the kernel model of test_ima.py, not from the parser.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from agent.attest.logs.eventlog import parse_event_log
from agent.attest.tpm.algorithms import BANKS, initial_pcr_value
from tests.attest_e2e.helpers import run_cli
from tests.attest_logs.test_ima import (
    BANK_SIZES,
    Measurement,
    d_ng,
    expected_pcr,
    sample_measurements,
)
from tests.attest_logs.test_ima_variants import ascii_list, binary_list, variants

GCE_LOG = (
    Path(__file__).resolve().parents[2].parent
    / "shared/testdata/eventlogs/tpm2-tools/event-gce-ubuntu-2104-log.bin"
)


def measurements() -> list[Measurement]:
    return sample_measurements() + variants()


def one_error_line(result: object) -> str:
    stderr = getattr(result, "stderr", "")
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return str(lines[0])


def test_text_output_lists_entries_and_pcrs(tmp_path: Path) -> None:
    path = tmp_path / "binary_runtime_measurements"
    path.write_bytes(binary_list(measurements()))
    result = run_cli("attest", "ima", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (
        f"{path}: binary list, {len(measurements())} entries from 0, template hashes in sha1, "
        f"{sum(m.violation for m in measurements())} violations"
    )
    bash = measurements()[1]
    assert f"#1      PCR 10 ima-ng sha256:{bash.fields[0][8:].hex()} /usr/bin/bash" in result.stdout
    assert f"        template {bash.template_hash().hex()}" in result.stdout
    assert "/etc/shadow  VIOLATION" in result.stdout
    assert "modsig 62 bytes" in result.stdout
    pcrs = result.stdout[result.stdout.index("\npcrs:\n") :]
    for bank in BANK_SIZES:
        assert f"    10: {expected_pcr(measurements(), bank).hex()}" in pcrs
        assert f"    11: {expected_pcr(measurements(), bank, 11).hex()}" in pcrs


@pytest.mark.parametrize("listed", ["sha1", "sha256", "sha384"])
def test_json_of_per_bank_lists(tmp_path: Path, listed: str) -> None:
    suffix = "" if listed == "sha1" else f"_{listed}"
    path = tmp_path / f"binary_runtime_measurements{suffix}"
    path.write_bytes(binary_list(measurements(), listed))
    result = run_cli("attest", "ima", str(path), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["template_hash_bank"] == listed
    assert document["format"] == "binary"
    assert len(document["entries"]) == len(measurements())
    assert document["entries"][0]["file_name"] == "boot_aggregate"
    assert document["violations"] == sum(m.violation for m in measurements())
    for bank in BANK_SIZES:
        assert document["pcrs"][bank] == {
            str(pcr): expected_pcr(measurements(), bank, pcr).hex() for pcr in (10, 11)
        }
    # The same list under another name: the bank is named on the command line.
    copy = tmp_path / "list"
    copy.write_bytes(path.read_bytes())
    again = run_cli("attest", "ima", str(copy), "--bank", listed, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["pcrs"] == document["pcrs"]


def test_ascii_list_and_the_legacy_replay(tmp_path: Path) -> None:
    listed = [m for m in measurements() if m.template != "evm-sig"]
    path = tmp_path / "ascii_runtime_measurements_sha256"
    path.write_bytes(ascii_list(listed, "sha256"))
    result = run_cli("attest", "ima", str(path), "--json", "--legacy-padded-sha1")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert (document["format"], document["template_hash_bank"]) == ("ascii", "sha256")
    assert document["legacy_padded_sha1"] is True
    value = bytes(64)
    for m in listed:
        if m.pcr == 10:
            padded = (b"\xff" * 20 if m.violation else m.template_hash("sha1")) + bytes(44)
            value = hashlib.sha512(value + padded).digest()
    assert document["pcrs"]["sha512"]["10"] == value.hex()
    assert document["pcrs"]["sha1"]["10"] == expected_pcr(listed, "sha1").hex()
    # sha256 is the list's own bank: its column, never padded.
    assert document["pcrs"]["sha256"]["10"] == expected_pcr(listed, "sha256").hex()


def test_an_ascii_list_of_unrebuildable_entries_replays_its_own_bank_only(tmp_path: Path) -> None:
    path = tmp_path / "ascii_runtime_measurements"
    path.write_bytes(ascii_list([variants()[6]]))
    document = json.loads(run_cli("attest", "ima", str(path), "--json").stdout)
    assert list(document["pcrs"]) == ["sha1"]


def boot_aggregate_list(bank: str, pcrs: dict[int, bytes]) -> bytes:
    used = range(8) if bank == "sha1" else range(10)
    aggregate = hashlib.new(bank, b"".join(pcrs[pcr] for pcr in used)).digest()
    first = Measurement("ima-ng", (d_ng(bank, aggregate), b"boot_aggregate\x00"))
    return binary_list([first, *sample_measurements()[1:3]])


@pytest.mark.parametrize("bank", ["sha1", "sha256"])
def test_boot_aggregate_checked_against_the_event_log(tmp_path: Path, bank: str) -> None:
    replayed = parse_event_log(GCE_LOG.read_bytes()).replay()[bank]
    pcrs = {pcr: replayed.get(pcr, initial_pcr_value(BANKS[bank], pcr)) for pcr in range(10)}
    path = tmp_path / "binary_runtime_measurements"
    path.write_bytes(boot_aggregate_list(bank, pcrs))
    result = run_cli("attest", "ima", str(path), "--event-log", str(GCE_LOG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"boot_aggregate ({bank}): " in result.stdout
    assert "matches the event log's PCRs" in result.stdout
    # A boot_aggregate from other PCR values (another boot, or a list from another machine).
    pcrs[7 if bank == "sha1" else 9] = bytes(BANK_SIZES[bank])
    path.write_bytes(boot_aggregate_list(bank, pcrs))
    result = run_cli("attest", "ima", str(path), "--event-log", str(GCE_LOG), "--json")
    assert result.returncode == 1
    aggregate = json.loads(result.stdout)["boot_aggregate"]
    assert (aggregate["bank"], aggregate["matches"], aggregate["no_tpm"]) == (bank, False, False)
    text = run_cli("attest", "ima", str(path), "--event-log", str(GCE_LOG))
    assert "DOES NOT match the event log's PCRs" in text.stdout


def test_an_all_zero_boot_aggregate_says_no_tpm(tmp_path: Path) -> None:
    path = tmp_path / "binary_runtime_measurements"
    path.write_bytes(binary_list(variants()[:1]))
    result = run_cli("attest", "ima", str(path))
    assert "boot_aggregate (sha256): " + "00" * 32 + " (all zero: the kernel found no TPM)" in (
        result.stdout
    )


def test_bad_input_is_one_line_with_the_exit_code(tmp_path: Path) -> None:
    data = binary_list(measurements())
    truncated = tmp_path / "binary_runtime_measurements"
    truncated.write_bytes(data[:-3])
    result = run_cli("attest", "ima", str(truncated))
    assert result.returncode == 1
    line = one_error_line(result)
    assert line.startswith(f"accelguard: error: entry {len(measurements()) - 1} (offset ")
    assert "remain (truncated list or corrupt length field)" in line

    tampered = tmp_path / "ascii_runtime_measurements"
    tampered.write_bytes(ascii_list(measurements()[:3]).replace(b"/usr/bin/bash", b"/usr/bin/bosh"))
    result = run_cli("attest", "ima", str(tampered))
    assert result.returncode == 1
    assert one_error_line(result).startswith(
        "accelguard: error: entry 1: template hash mismatch: the list says "
    )

    wrong_bank = run_cli("attest", "ima", str(truncated), "--bank", "sha256")
    assert wrong_bank.returncode == 1
    assert "(is this a list of 32-byte template hashes?)" in one_error_line(wrong_bank)

    unknown = run_cli("attest", "ima", str(truncated), "--bank", "md5")
    assert unknown.returncode == 2
    assert one_error_line(unknown).startswith("accelguard: error: --bank 'md5': unknown bank")

    odd_name = tmp_path / "binary_runtime_measurements_md5"
    odd_name.write_bytes(data)
    result = run_cli("attest", "ima", str(odd_name))
    assert result.returncode == 2
    assert one_error_line(result).endswith("name the bank explicitly (--bank)")

    missing = run_cli("attest", "ima", str(tmp_path / "absent"))
    assert missing.returncode == 1
    assert "cannot read IMA measurement list" in one_error_line(missing)

    no_aggregate = tmp_path / "list.bin"
    no_aggregate.write_bytes(binary_list(measurements()[1:3]))
    result = run_cli("attest", "ima", str(no_aggregate), "--event-log", str(GCE_LOG))
    assert result.returncode == 2
    assert "does not start with a boot_aggregate entry" in one_error_line(result)


def test_random_bytes_never_give_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "binary_runtime_measurements"
    for seed in range(5):
        path.write_bytes(hashlib.sha512(b"%d" % seed).digest() * 3)
        result = run_cli("attest", "ima", str(path))
        assert result.returncode == 1
        assert one_error_line(result).startswith("accelguard: error: entry 0")
