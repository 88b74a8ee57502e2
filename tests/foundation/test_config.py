from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from agent.config import Config, load_config, parse_config, to_toml
from agent.errors import ConfigError
from tests.support import run_cli


def test_defaults_are_a_valid_config() -> None:
    config = parse_config({})
    assert config == Config()
    assert config.admin.socket_mode == "0660"
    assert parse_config(__import__("tomllib").loads(to_toml(config))) == config


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"admin": {"sockt": "/x"}}, "admin.sockt: unknown key"),
        ({"bogus": {}}, "bogus: unknown key"),
        ({"admin": {"socket_mode": "0999"}}, "admin.socket_mode: must be an octal"),
        ({"admin": {"socket": "relative.sock"}}, "admin.socket: must be an absolute path"),
        ({"node": {"profile": "cloud"}}, "node.profile: must be one of"),
        ({"inventory": {"refresh_interval_s": 0}}, "inventory.refresh_interval_s: must be greater"),
        (
            {"inventory": {"refresh_interval_s": "5"}},
            "inventory.refresh_interval_s: expected a number",
        ),
        ({"hotplug": {"enabled": 1}}, "hotplug.enabled: expected true or false"),
        ({"tenants": {"cgroup_parents": "/sys"}}, "tenants.cgroup_parents: expected a list"),
        (
            {"tenants": {"cgroup_parents": [3]}},
            "tenants.cgroup_parents[0]: expected a non-empty path",
        ),
        ({"node": 3}, "node: expected a table"),
    ],
)
def test_bad_values_name_the_key(document: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=r"^" + message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(document)


def test_config_check_prints_effective_config(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[node]\nid = "gpu-node-7"\n[inventory]\nrefresh_interval_s = 5\n')
    result = run_cli("config", "check", config=path)
    assert result.returncode == 0, result.stderr
    assert 'id = "gpu-node-7"' in result.stdout
    assert "refresh_interval_s = 5.0" in result.stdout
    assert 'socket_mode = "0660"' in result.stdout  # defaults are shown too


def test_config_check_output_reads_back_with_hostile_strings(tmp_path: Path) -> None:
    """`config check > agent.toml` must give back the same config whatever its strings hold: a
    newline, both quote characters, backslashes (a Windows-style path), a tab, non-ASCII."""
    hostile = 'line one\nline "two" \'three\' C:\\dir\\ \t\u00e9 \\"'
    trailing_backslash = hostile + "\\"
    cgroup = "/sys/fs/cgroup/a\nb"
    # json.dumps writes the TOML basic-string escapes (\n \t \" \\ \uXXXX): an encoder that
    # owes nothing to the writer under test.
    path = tmp_path / "agent.toml"
    path.write_text(
        f"[node]\nid = {json.dumps(hostile)}\n"
        f"[attest]\ntcti = {json.dumps(trailing_backslash)}\n"
        f"[tenants]\ncgroup_parents = [{json.dumps(cgroup)}]\n"
    )
    expected = load_config(path)
    assert (expected.node.id, expected.attest.tcti) == (hostile, trailing_backslash)
    assert expected.tenants.cgroup_parents == [Path(cgroup)]
    result = run_cli("config", "check", config=path)
    assert result.returncode == 0, result.stderr
    assert parse_config(tomllib.loads(result.stdout)) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[admin]\nsocket_mode = 660\n", "admin.socket_mode: expected a string"),
        ("[node\n", "not valid TOML"),
        ("[logging]\nlevel = 'loud'\n", "logging.level: must be one of"),
    ],
)
def test_config_check_rejects_bad_file_in_one_line(
    tmp_path: Path, text: str, fragment: str
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    result = run_cli("config", "check", config=path)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]
    assert str(path) in lines[0]


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("0666", "must grant nothing to others"),
        ("0777", "must grant nothing to others"),
        ("0662", "must grant nothing to others"),
        ("0604", "must grant nothing to others"),
        ("0001", "must grant nothing to others"),
        ("1660", "must be at most '0770'"),
        ("4770", "must be at most '0770'"),
        ("2660", "must be at most '0770'"),
        ("0o660", "must be an octal file mode"),
        (" 660", "must be an octal file mode"),
        ("6_60", "must be an octal file mode"),
        ("660 ", "must be an octal file mode"),
        ("", "must be an octal file mode"),
        ("07777", "must be an octal file mode"),
    ],
)
def test_admin_socket_mode_never_opens_the_socket_to_others(mode: str, reason: str) -> None:
    """Whoever can connect can move tenants' GPUs: "other" gets nothing, ever."""
    with pytest.raises(ConfigError) as raised:
        parse_config({"admin": {"socket_mode": mode}})
    assert str(raised.value).startswith(f"admin.socket_mode: {reason}")
    assert str(raised.value).endswith(f"(got {mode!r})")


@pytest.mark.parametrize("mode", ["0660", "0600", "0770", "0640", "0700", "0000", "660", "0750"])
def test_admin_socket_modes_for_owner_and_group_are_accepted(mode: str) -> None:
    assert parse_config({"admin": {"socket_mode": mode}}).admin.socket_mode == mode


def test_world_writable_socket_config_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[admin]\nsocket_mode = "0666"\n')
    for command in (["config", "check"], ["agent"]):
        result = run_cli(*command, config=path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip() == (
            f"accelguard: error: {path}: admin.socket_mode: must grant nothing to others (use "
            "'0660' with admin.group, or '0600') (got '0666')"
        )


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.toml")
