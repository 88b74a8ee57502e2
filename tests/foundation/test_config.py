from __future__ import annotations

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


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.toml")
