"""The CLI behaves as kubectl and nvidia-smi users expect: quiet under ``| head``, no abbreviated
options, one clear line when the agent is down, errors as JSON with ``--json``, no silent defaults
for a missing config. Each runs the real CLI as a subprocess."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from agent.cli import build_parser
from agent.config import DEFAULT_CONFIG_PATH
from tests.support import ACCELGUARD, REPO, RunningAgent, run_cli, wait_settled

TESTDATA = REPO.parent / "shared/testdata/eventlogs/tpm2-tools"


@pytest.fixture
def down_config(tmp_path: Path) -> Path:
    """A config whose admin socket nobody serves (the file is absent until a test makes one)."""
    path = tmp_path / "agent.toml"
    admin, state = tmp_path / "admin.sock", tmp_path / "state"
    path.write_text(f'[admin]\nsocket = "{admin}"\n[node]\nstate_dir = "{state}"\n')
    return path


def _admin_socket(config: Path) -> Path:
    return config.parent / "admin.sock"


def _run_reader_gone(*args: str) -> subprocess.CompletedProcess[bytes]:
    """The CLI with stdout a pipe whose reader has already exited: `| head -1`, without the race."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [*ACCELGUARD, *args], stdout=write_end, stderr=subprocess.PIPE,
            timeout=120, check=False, cwd=REPO,
        )  # fmt: skip
    finally:
        os.close(write_end)


# --- 1. a reader that goes away ------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["status"], ["status", "--json"], ["lease", "list", "--json"], ["partition", "list"]],
)
def test_reader_gone_exits_quietly(agent: RunningAgent, command: list[str]) -> None:
    # Something to list: an empty list says so on stderr ("no partitions").
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=1")
    wait_settled(agent)
    result = _run_reader_gone("--config", str(agent.config_path), *command)
    assert result.stderr == b""
    assert result.returncode == 141  # as for any tool SIGPIPE kills: `yes | head` under pipefail


def test_reader_gone_without_agent(down_config: Path) -> None:
    result = _run_reader_gone("--config", str(down_config), "config", "check")
    assert (result.returncode, result.stderr) == (141, b"")


# --- 2. no abbreviated long options ---------------------------------------------------------------


MIG_PARTED = REPO / "tests/planner/data/mig-parted-config.yaml"


@pytest.mark.parametrize(
    ("abbreviated", "full"),
    [
        # The abbreviation that started this: `--config` silently meant `--config-name`.
        (["layout", "plan", "-f", str(MIG_PARTED), "--config", "all-1g.10gb"],
         ["layout", "plan", "-f", str(MIG_PARTED), "--config-name", "all-1g.10gb"]),
        (["lease", "list", "--js"], ["lease", "list", "--json"]),
        (["partition", "quarantine", "MIG-x", "--reason", "r", "--js"],
         ["partition", "quarantine", "MIG-x", "--reason", "r", "--json"]),
    ],
)  # fmt: skip
def test_abbreviated_options_are_refused(
    down_config: Path, abbreviated: list[str], full: list[str]
) -> None:
    refused = run_cli(*abbreviated, config=down_config)
    assert refused.returncode == 2
    (option,) = set(abbreviated) - set(full)
    assert f"unrecognized arguments: {option}" in refused.stderr
    # The full name parses: the command gets as far as the (absent) agent.
    parsed = run_cli(*full, config=down_config)
    assert parsed.returncode == 1, parsed.stderr
    assert "cannot reach the agent" in parsed.stderr


def test_top_level_option_is_not_abbreviated(down_config: Path) -> None:
    result = run_cli("--conf", str(down_config), "status")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr  # `--conf` is not an option, so its value is COMMAND


def test_every_parser_refuses_abbreviations() -> None:
    """Walks the whole tree, so that a verb added later cannot bring abbreviations back."""
    pending = [build_parser()]
    seen = 0
    while pending:
        parser = pending.pop()
        assert parser.allow_abbrev is False, parser.prog
        seen += 1
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending.extend(action.choices.values())
    assert seen > 30


# --- 3. the agent is down -------------------------------------------------------------------------


@pytest.mark.parametrize("stale", [False, True], ids=["no-socket", "stale-socket"])
def test_agent_down_is_one_clear_line(down_config: Path, stale: bool) -> None:
    path = _admin_socket(down_config)
    if stale:  # what a killed agent leaves: a socket file that nothing listens on
        left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        left.bind(str(path))
        left.close()
    result = run_cli("status", config=down_config)
    assert result.returncode == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"accelguard: error: cannot reach the agent at {path} (")
    assert ("a stale socket: nothing listens on it" if stale else "no socket there") in line
    assert "`systemctl start accelguard`" in line
    assert "`accelguard agent`" in line
    assert "failed to connect" not in line


# --- 4. errors as JSON with --json ----------------------------------------------------------------


def _json_error(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    document = json.loads(line)
    assert list(document) == ["error"]
    error: dict[str, object] = document["error"]
    assert sorted(error) == ["code", "kind", "message"]
    assert error["code"] == result.returncode
    return error


def test_json_error_when_agent_is_down(down_config: Path) -> None:
    error = _json_error(run_cli("status", "--json", config=down_config))
    assert error["code"] == 1
    assert error["kind"] == "daemon_unavailable"
    assert str(_admin_socket(down_config)) in str(error["message"])


def test_json_error_from_the_agent(agent: RunningAgent) -> None:
    error = _json_error(agent.cli("lease", "release", "lease-nonexistent", "--json"))
    assert (error["code"], error["kind"]) == (4, "not_found")
    assert "lease-nonexistent" in str(error["message"])


def test_without_json_the_error_stays_one_plain_line(down_config: Path) -> None:
    result = run_cli("status", config=down_config)
    assert result.stderr.startswith("accelguard: error: ")


def test_argparse_errors_stay_plain(down_config: Path) -> None:
    result = run_cli("lease", "release", "--json", config=down_config)
    assert result.returncode == 2
    assert "the following arguments are required: lease_id" in result.stderr


# --- 5. a missing config is an error, where a verb needs one --------------------------------------


@pytest.mark.parametrize(
    "command",
    [["status"], ["config", "check"], ["lease", "list"], ["sim", "reset-gpu", "--gpu", "0"],
     ["audit", "verify"], ["state", "export", "/dev/null"]],
)  # fmt: skip
def test_missing_explicit_config_is_an_error(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "absent.toml"
    result = run_cli(*command, config=missing)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line == (
        f"accelguard: error: cannot read config: no file at {missing} "
        "(pass --config FILE; `accelguard config check` validates one)"
    )


def test_missing_config_as_json(tmp_path: Path) -> None:
    error = _json_error(run_cli("lease", "list", "--json", config=tmp_path / "absent.toml"))
    assert (error["code"], error["kind"]) == (2, "config")


@pytest.mark.skipif(DEFAULT_CONFIG_PATH.exists(), reason="this host has an agent config")
@pytest.mark.parametrize("command", [["status"], ["config", "check"]])
def test_missing_default_config_is_an_error(command: list[str]) -> None:
    result = run_cli(*command)
    assert result.returncode == 2
    assert f"no file at {DEFAULT_CONFIG_PATH}" in result.stderr


@pytest.mark.skipif(DEFAULT_CONFIG_PATH.exists(), reason="this host has an agent config")
def test_verbs_that_read_only_their_files_need_no_config(tmp_path: Path) -> None:
    eventlog = run_cli("attest", "eventlog", str(TESTDATA / "event-uefivar.bin"))
    assert eventlog.returncode == 0, eventlog.stderr
    node = run_cli("sim", "init", "--dir", str(tmp_path / "node"))
    assert node.returncode == 0, node.stderr
