"""`accelguard sim tpm`: attestation tried on a simulated node, as docs/simulated-node.md says.

The verb runs in the foreground as an operator would run it in a second terminal; the quote, the
policy and the verification are the same CLI verbs a real node uses, each a real process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_config
from agent.sim.node import init_sim_node
from tests.attest_e2e.helpers import ACCELGUARD, BOOT_LOG, REPO, TESTDATA, run_cli

NONCE = "00112233445566778899aabbccddeeff"


@pytest.fixture
def node(tmp_path: Path) -> Path:
    return init_sim_node(tmp_path / "node", "h100x1", slice_bytes=1 << 20).root


def _start(node: Path, event_log: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [*ACCELGUARD, "sim", "tpm", "--dir", str(node), "--event-log", str(event_log)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("ready"):
            return process
    _, stderr = process.communicate(timeout=30)
    raise AssertionError(f"sim tpm exited {process.returncode}: {stderr}")


def _stop(process: subprocess.Popen[str]) -> int:
    """SIGTERM, as `kill` or systemd sends it; the exit code, once its output is read."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    process.communicate(timeout=30)
    return process.returncode


@pytest.fixture
def running(node: Path) -> Iterator[subprocess.Popen[str]]:
    process = _start(node, TESTDATA / BOOT_LOG)
    try:
        yield process
    finally:
        _stop(process)


def _quote(node: Path, out: Path) -> subprocess.CompletedProcess[str]:
    config = str(node / "agent.toml")
    return run_cli("--config", config, "attest", "quote", "--nonce", NONCE, "-o", str(out))


def test_quote_of_the_sim_tpm_verifies_against_a_policy_of_its_log(
    node: Path, running: subprocess.Popen[str], tmp_path: Path
) -> None:
    config = load_config(node / "agent.toml")
    assert config.attest.tcti.startswith("swtpm:")
    assert config.attest.event_log.read_bytes() == (TESTDATA / BOOT_LOG).read_bytes()
    evidence = tmp_path / "evidence.json"
    quoted = _quote(node, evidence)
    assert quoted.returncode == 0, quoted.stderr
    policy = tmp_path / "policy.json"
    made = run_cli("attest", "make-policy", str(TESTDATA / BOOT_LOG), "-o", str(policy))
    assert made.returncode == 0, made.stderr
    verified = run_cli(
        "attest", "verify", str(evidence), "--nonce", NONCE, "--policy", str(policy), "--json"
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["ok"] is True

    # A log that is not what was measured fails: the event log in the evidence is the TPM's
    # only witness, and another machine's log does not replay to these PCRs.
    other = tmp_path / "other.json"
    other_log = TESTDATA / "event-sd-boot-fedora37.bin"
    swapped = run_cli(
        "--config", str(node / "agent.toml"), "attest", "quote", "--nonce", NONCE,
        "--event-log", str(other_log), "-o", str(other),
    )  # fmt: skip
    assert swapped.returncode == 0, swapped.stderr
    refused = run_cli("attest", "verify", str(other), "--nonce", NONCE, "--json")
    assert refused.returncode != 0


def test_stops_on_sigterm_and_takes_its_swtpm_along(node: Path) -> None:
    process = _start(node, TESTDATA / BOOT_LOG)
    tcti = load_config(node / "agent.toml").attest.tcti
    port = int(tcti.rsplit("port=", 1)[1])
    assert _stop(process) == 0
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_a_broken_event_log_is_one_line_and_starts_nothing(node: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.bin"
    broken.write_bytes(os.urandom(64))
    before = (node / "agent.toml").read_text()
    result = run_cli("sim", "tpm", "--dir", str(node), "--event-log", str(broken))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert (node / "agent.toml").read_text() == before
    assert not (node / "tpm" / "state").exists()
