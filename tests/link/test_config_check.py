"""`accelguard config check` covers the controller's config as well as the agent's."""

from __future__ import annotations

import tomllib
from pathlib import Path

from tests.link.support import Controller, run_tool


def test_config_check_reads_and_prints_controller_toml(tmp_path: Path) -> None:
    controller = Controller(tmp_path / "controller")
    controller.init()
    checked = run_tool("config", "check", "--controller", str(controller.config_path))
    assert checked.returncode == 0, checked.stderr
    effective = tomllib.loads(checked.stdout)
    assert effective == tomllib.loads(
        run_tool("controller", "check-config", "--config", str(controller.config_path)).stdout
    )
    broken = tmp_path / "broken.toml"
    broken.write_text(controller.config_path.read_text() + "\n[controller]\nbogus = 1\n")
    refused = run_tool("config", "check", "--controller", str(broken))
    assert refused.returncode == 2, refused.stdout
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
