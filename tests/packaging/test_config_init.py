"""``accelguard config init`` and its template, agent/config_template.toml (the package's
/etc/accelguard/agent.toml): every key of agent/config.py is there, under its section, commented
out at its real default with a comment saying what it does; and the file is written without ever
replacing one that exists, unless --force."""

from __future__ import annotations

import dataclasses
import re
import stat
import subprocess
from pathlib import Path

from agent.cli.node import config_template
from agent.config import Config, load_config, parse_config
from tests.support import ACCELGUARD, REPO, run_cli

TEMPLATE = REPO / "agent" / "config_template.toml"
# Keys whose default depends on the host: the template shows an example instead.
HOST_DEPENDENT = {("node", "id")}
_SECTION = re.compile(r"\[([a-z_]+)\]")
# A key at its default: "#key = value", the "#" right before the key (comments have "# ").
_KEY = re.compile(r"#([a-z_]+) = (.+)")


def _template_keys(text: str) -> dict[tuple[str, str], int]:
    """(section, key) -> line number of each commented-out key line."""
    keys: dict[tuple[str, str], int] = {}
    section = ""
    for number, line in enumerate(text.splitlines(), 1):
        if header := _SECTION.fullmatch(line):
            section = header.group(1)
        elif key := _KEY.fullmatch(line):
            assert (section, key.group(1)) not in keys, f"line {number}: {line} again"
            keys[(section, key.group(1))] = number
    return keys


def _uncommented(text: str) -> str:
    return "\n".join(line[1:] if _KEY.fullmatch(line) else line for line in text.splitlines())


def test_the_template_reads_as_the_defaults() -> None:
    assert load_config(TEMPLATE) == Config()


def test_every_value_shown_is_the_default() -> None:
    import tomllib  # noqa: PLC0415

    shown = parse_config(tomllib.loads(_uncommented(TEMPLATE.read_text())))
    expected = Config()
    for section, key in HOST_DEPENDENT:
        part = dataclasses.replace(
            getattr(expected, section), **{key: getattr(getattr(shown, section), key)}
        )
        expected = dataclasses.replace(expected, **{section: part})
    assert shown == expected


def test_every_section_and_key_is_in_the_template_with_a_comment() -> None:
    text = TEMPLATE.read_text()
    found = _template_keys(text)
    wanted = {
        (section.name, key.name)
        for section in dataclasses.fields(Config)
        for key in dataclasses.fields(getattr(Config(), section.name))
    }
    assert sorted(wanted - found.keys()) == [], "keys missing from agent/config_template.toml"
    assert sorted(found.keys() - wanted) == [], "keys in the template that the config lacks"
    lines = text.splitlines()
    for (section, key), number in found.items():
        assert lines[number - 2].startswith("# "), f"{section}.{key}: no comment line above it"
    headers = [h.group(1) for line in lines if (h := _SECTION.fullmatch(line))]
    assert headers == [section.name for section in dataclasses.fields(Config)]


def test_the_package_ships_the_template() -> None:
    assert config_template() == TEMPLATE.read_text()


def _init(*args: str, umask: int = 0o077) -> subprocess.CompletedProcess[str]:
    # A restrictive umask: the modes written must not depend on it.
    command = ["sh", "-c", f'umask {umask:03o} && exec "$@"', "sh", *ACCELGUARD, *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=60, check=False, cwd=REPO
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_the_template_with_its_directories(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "accelguard" / "agent.toml"
    result = _init("config", "init", "--path", str(path))
    assert result.returncode == 0, result.stderr
    assert str(path) in result.stdout
    assert path.read_text() == TEMPLATE.read_text()
    assert _mode(path) == 0o644
    assert _mode(path.parent) == _mode(path.parent.parent) == 0o755
    assert sorted(p.name for p in path.parent.iterdir()) == ["agent.toml"]  # no temporary left
    check = run_cli("config", "check", config=path)
    assert check.returncode == 0, check.stderr
    assert load_config(path) == Config()


def test_init_never_replaces_a_file_without_force(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[node]\nid = "mine"\n')
    refused = _init("config", "init", "--path", str(path))
    assert refused.returncode == 2
    assert f"{path} exists" in refused.stderr and "--force" in refused.stderr
    assert path.read_text() == '[node]\nid = "mine"\n'

    # A symbolic link is a file there too, even a dangling one.
    link = tmp_path / "link.toml"
    link.symlink_to(tmp_path / "nowhere.toml")
    assert _init("config", "init", "--path", str(link)).returncode == 2
    assert not (tmp_path / "nowhere.toml").exists()

    forced = _init("config", "init", "--path", str(path), "--force")
    assert forced.returncode == 0, forced.stderr
    assert path.read_text() == TEMPLATE.read_text()
    assert _mode(path) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.toml", "link.toml"]


def test_init_needs_no_config_and_writes_where_config_points(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "agent.toml"
    result = _init("--config", str(path), "config", "init")
    assert result.returncode == 0, result.stderr
    assert path.read_text() == TEMPLATE.read_text()
    # --path wins over --config.
    other = tmp_path / "other.toml"
    assert _init("--config", str(path), "config", "init", "--path", str(other)).returncode == 0
    assert other.exists()


def test_init_reports_a_directory_it_cannot_write(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = _init("config", "init", "--path", str(blocker / "agent.toml"))
    assert result.returncode == 1
    assert f"cannot write {blocker / 'agent.toml'}" in result.stderr
    assert "Traceback" not in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
