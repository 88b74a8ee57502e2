"""`accelguard attest ...` end to end against a booted swtpm.

Two ways in: through a small argparse carrying exactly what agent/attest/commands.py adds (so
the verbs are tested before and independently of their wiring into agent/cli.py), and through
`python -m agent.cli`, the way an operator runs them.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given

from agent.attest.evidence import load_evidence
from agent.attest.selection import parse_pcr_selection
from agent.attest.tpm.algorithms import BANKS
from agent.cli import main
from agent.cli.attest import add_parsers as add_attest_parser
from agent.cli.attest import run as run_attest
from agent.config import load_config
from agent.errors import ValidationError
from tests.attest_e2e.helpers import (
    ACCELGUARD,
    SELECTION_TEXT,
    TESTDATA,
    BootedTpm,
    ima_list,
    run_cli,
    with_event_digest_changed,
    write_config,
)
from tests.fuzzing import MUTATIONS, fuzz, mutate

SHIM_EVENT = 23  # PCR 4, EV_EFI_BOOT_SERVICES_APPLICATION in the GCE log
REAL_LOGS = sorted(path.name for path in TESTDATA.glob("*.bin"))


@pytest.fixture(scope="module")
def node(booted: BootedTpm, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config pointing `attest quote` at the booted swtpm and the logs it measured."""
    directory = tmp_path_factory.mktemp("node")
    event_log = directory / "binary_bios_measurements"
    event_log.write_bytes(booted.event_log)
    ima_path = directory / "binary_runtime_measurements"
    ima_path.write_bytes(ima_list(booted.measurements))
    return write_config(directory / "agent.toml", booted, event_log, ima_path)


def in_process(config: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="accelguard")
    add_attest_parser(parser.add_subparsers(dest="command", required=True))
    return run_attest(parser.parse_args(["attest", *argv]), load_config(config))


def quote(config: Path, output: Path, nonce: str) -> Path:
    result = run_cli(
        "--config", str(config), "attest", "quote", "--nonce", nonce, "-o", str(output)
    )
    assert result.returncode == 0, result.stderr
    return output


def tampered_copy(evidence_path: Path, target: Path) -> Path:
    document = json.loads(evidence_path.read_text())
    evidence = load_evidence(evidence_path)
    changed = with_event_digest_changed(evidence.event_log, SHIM_EVENT)
    document["event_log"] = base64.b64encode(changed).decode()
    target.write_text(json.dumps(document))
    return target


# --- in process ---------------------------------------------------------------------------------


def test_quote_and_verify_in_process(
    node: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nonce = os.urandom(16).hex()
    evidence = tmp_path / "evidence.json"
    assert in_process(node, "quote", "--nonce", nonce, "-o", str(evidence)) == 0
    assert load_evidence(evidence).nonce.hex() == nonce
    state = tmp_path / "state.json"
    verify = ["verify", str(evidence), "--nonce", nonce, "--pcrs", SELECTION_TEXT]
    assert in_process(node, *verify, "--state", str(state)) == 0
    assert "result: PASS" in capsys.readouterr().out
    # Presented again: the state file remembers the quote's clock.
    assert in_process(node, *verify, "--state", str(state)) == 1
    assert "FAILED clock: clock_not_advanced" in capsys.readouterr().out
    tampered = tampered_copy(evidence, tmp_path / "tampered.json")
    assert in_process(node, "verify", str(tampered), "--nonce", nonce) == 1
    out = capsys.readouterr().out
    assert "FAILED event_log: eventlog_pcr_mismatch: PCR 4 (sha256)" in out
    assert "result: FAIL" in out


def test_pcr_selection_syntax() -> None:
    assert parse_pcr_selection("sha256:0-3,7+sha1:14") == {"sha256": [0, 1, 2, 3, 7], "sha1": [14]}
    for bad in ("sha256", "sha256:", "md5:1", "sha256:3-1", "sha256:24", "sha256:1+sha256:2",
                "sha256:a", "sha256:1,,2"):  # fmt: skip
        with pytest.raises(ValidationError, match="--pcrs"):
            parse_pcr_selection(bad)


# --- through `python -m agent.cli` --------------------------------------------------------------


def test_quote_then_verify(node: Path, tmp_path: Path) -> None:
    nonce = os.urandom(32).hex()
    evidence = quote(node, tmp_path / "evidence.json", nonce)
    result = run_cli(
        "attest", "verify", str(evidence), "--nonce", nonce, "--pcrs", SELECTION_TEXT, "--json"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["checks"]["event_log"] == report["checks"]["ima"] == "passed"
    assert report["checks"]["freshness"] == "passed"


def test_tampered_evidence_exits_1_with_the_reason(node: Path, tmp_path: Path) -> None:
    nonce = os.urandom(32).hex()
    evidence = quote(node, tmp_path / "evidence.json", nonce)
    tampered = tampered_copy(evidence, tmp_path / "tampered.json")
    result = run_cli("attest", "verify", str(tampered), "--nonce", nonce)
    assert result.returncode == 1
    assert "eventlog_pcr_mismatch" in result.stdout
    assert "PCR 4" in result.stdout
    wrong_nonce = run_cli("attest", "verify", str(evidence), "--nonce", os.urandom(32).hex())
    assert wrong_nonce.returncode == 1
    assert "FAILED freshness: nonce_mismatch" in wrong_nonce.stdout


def test_replay_is_caught_with_a_state_file(node: Path, tmp_path: Path) -> None:
    nonce = os.urandom(32).hex()
    evidence = quote(node, tmp_path / "evidence.json", nonce)
    state = tmp_path / "verifier-state.json"
    first = run_cli("attest", "verify", str(evidence), "--nonce", nonce, "--state", str(state))
    assert first.returncode == 0, first.stdout + first.stderr
    assert json.loads(state.read_text())["version"] == 1
    again = run_cli("attest", "verify", str(evidence), "--nonce", nonce, "--state", str(state))
    assert again.returncode == 1
    assert "clock_not_advanced" in again.stdout


def test_verify_without_nonce_says_freshness_was_not_checked(node: Path, tmp_path: Path) -> None:
    evidence = quote(node, tmp_path / "evidence.json", os.urandom(8).hex())
    result = run_cli("attest", "verify", str(evidence))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "NOT CHECKED freshness: freshness_not_checked: freshness not checked" in result.stdout


def test_make_policy_then_verify_with_it(node: Path, tmp_path: Path) -> None:
    nonce = os.urandom(32).hex()
    evidence = quote(node, tmp_path / "evidence.json", nonce)
    good = tmp_path / "good-policy.json"
    made = run_cli("attest", "make-policy", str(TESTDATA / "event-gce-ubuntu-2104-log.bin"),
                   "-o", str(good), "--description", "gce known good")  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert json.loads(good.read_text())["description"] == "gce known good"
    result = run_cli("attest", "verify", str(evidence), "--nonce", nonce, "--policy", str(good))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "policy passed" in result.stdout

    other = tmp_path / "other-policy.json"
    made = run_cli("attest", "make-policy", str(TESTDATA / "event-moklisttrusted.bin"),
                   "--pcrs", "sha256:0-7", "-o", str(other))  # fmt: skip
    assert made.returncode == 0, made.stderr
    result = run_cli("attest", "verify", str(evidence), "--nonce", nonce, "--policy", str(other))
    assert result.returncode == 1
    assert "FAILED policy: policy_pcr_mismatch" in result.stdout


@pytest.mark.parametrize("name", REAL_LOGS)
def test_eventlog_json_pcrs_match_the_yaml(name: str) -> None:
    result = run_cli("attest", "eventlog", str(TESTDATA / name), "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    text = (TESTDATA / f"{name}.yaml").read_text()
    expected = yaml.safe_load(text[text.index("\npcrs:") :])["pcrs"]
    assert printed["pcrs"] == {
        bank: {
            str(pcr): value.to_bytes(BANKS[bank].digest_size, "big").hex()
            for pcr, value in values.items()
        }
        for bank, values in expected.items()
    }
    assert len(printed["events"]) > 0


def test_eventlog_text_output() -> None:
    result = run_cli("attest", "eventlog", str(TESTDATA / "event-uefivar.bin"))
    assert result.returncode == 0, result.stderr
    assert "EV_EFI_VARIABLE_DRIVER_CONFIG" in result.stdout
    assert "pcrs:" in result.stdout


def test_errors_are_one_line_with_the_right_exit_code(node: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": 1}')
    result = run_cli("attest", "verify", str(broken))
    assert result.returncode == 1
    assert (
        result.stderr.strip() == "accelguard: error: evidence.ak_public: required field is missing"
    )
    bad_nonce = run_cli("--config", str(node), "attest", "quote", "--nonce", "xyz")
    assert bad_nonce.returncode == 2
    assert bad_nonce.stderr.startswith("accelguard: error: --nonce")
    missing_log = run_cli("--config", str(node), "attest", "quote", "--nonce", "00",
                          "--event-log", str(tmp_path / "absent"))  # fmt: skip
    assert missing_log.returncode == 1
    assert "cannot read event log" in missing_log.stderr


# --- hostile files (issue 8) ---------------------------------------------------------------------

# What a file given as evidence or policy may hold instead of the document: each is refused by
# the reader (agent/inputs.py) before the format's checks see it.
HOSTILE_JSON = {
    "duplicate": (
        b'{"version": 1, "nonce": "00", "nonce": "01"}',
        "member name 'nonce' appears twice",
    ),
    "nan": (b'{"version": NaN}', "NaN is not a JSON number"),
    "deep": (b"[" * 1_000_000 + b"]" * 1_000_000, "nested deeper than 8 levels"),
    "not-utf8": (b'{"version": 1, "nonce": "\xff"}', "not UTF-8 text"),
    "surrogate": (b'{"pcrs": {"\\udc00": {}}}', "unpaired surrogate"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_JSON))
@pytest.mark.parametrize("option", ["evidence", "--policy"])
def test_hostile_json_is_one_line_exit_2(tmp_path: Path, name: str, option: str) -> None:
    data, reason = HOSTILE_JSON[name]
    hostile = tmp_path / f"{name}.json"
    hostile.write_bytes(data)
    harmless = tmp_path / "harmless.json"
    harmless.write_text("{}")
    if option == "evidence":
        result = run_cli("attest", "verify", str(hostile))
        what = "evidence"
    else:
        result = run_cli("attest", "verify", str(harmless), "--policy", str(hostile))
        what = "policy"
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"accelguard: error: {what} {hostile}: "), result.stderr
    assert reason in result.stderr
    assert len(result.stderr.splitlines()) == 1


PEAK_RSS = """
import json, resource, subprocess, sys
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps([result.returncode, result.stderr,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]))
"""


def subprocess_json(command: list[str]) -> Any:
    completed = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)
    return json.loads(completed.stdout)


def test_evidence_of_many_small_items_is_refused_in_little_memory(tmp_path: Path) -> None:
    """The issue's 112 MB input took 2.9 GB: within the byte cap, but 37 million dicts. The item
    count is refused before json builds them; the child's peak RSS says what it cost."""
    hostile = tmp_path / "items.json"
    hostile.write_bytes(b"[" + b"{}," * 37_000_000 + b"{}]")
    measured = subprocess_json(
        [sys.executable, "-c", PEAK_RSS, *ACCELGUARD, "attest", "verify", str(hostile)]
    )
    code, stderr, peak = measured
    assert code == 2, stderr
    assert stderr == (
        f"accelguard: error: evidence {hostile}: more than 1024 array elements and object members\n"
    )
    assert peak < 400 << 20  # the file's 111 MB read once, plus the interpreter


def test_evidence_over_the_byte_cap_is_refused_unread(tmp_path: Path) -> None:
    from agent.attest.evidence import MAX_DOCUMENT_BYTES  # noqa: PLC0415

    huge = tmp_path / "huge.json"
    with huge.open("wb") as stream:
        stream.truncate(10 * MAX_DOCUMENT_BYTES)  # sparse
    result = run_cli("attest", "verify", str(huge), timeout=30)
    assert result.returncode == 2
    assert result.stderr == (
        f"accelguard: error: evidence {huge}: {10 * MAX_DOCUMENT_BYTES} bytes, over the "
        f"{MAX_DOCUMENT_BYTES}-byte limit\n"
    )


@pytest.fixture(scope="module")
def real_evidence(node: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    directory = tmp_path_factory.mktemp("fuzz")
    return quote(node, directory / "evidence.json", os.urandom(16).hex()).read_bytes()


@fuzz(300)
@given(mutations=MUTATIONS)
def test_mutated_evidence_never_raises(
    real_evidence: bytes, tmp_path_factory: pytest.TempPathFactory, mutations: Any
) -> None:
    """Flipped, cut and inserted bytes of a real evidence file through the whole CLI, in
    process: an exit code, never an exception (RecursionError, KeyError, UnicodeError...)."""
    path = tmp_path_factory.getbasetemp() / "mutated-evidence.json"
    path.write_bytes(mutate(real_evidence, mutations))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["attest", "verify", str(path)]) in (0, 1, 2)
