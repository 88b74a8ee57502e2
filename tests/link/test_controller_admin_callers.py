"""Who may change the fleet: the controller's admin socket knows each caller from the kernel
(SO_PEERCRED, the same gate as the node's: agent/admin/peers.py). Root and members of
controller.admin_group may create tokens, run commands, set policies and groups and rotate the
command key; members of admin_read_group may only read; a refused call changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.leases.test_admin_callers import NOBODY, SITE, SYSTEM_PYTHON, _system_python_matches
from tests.link.support import Controller
from tests.support import REPO


@pytest.fixture
def shared_controller(tmp_path: Path) -> Iterator[tuple[Controller, Path]]:
    if not _system_python_matches():
        pytest.skip(f"no {SYSTEM_PYTHON} of this Python version to run the CLI as nobody")
    public = Path(tempfile.mkdtemp(prefix="ag-ctl-"))
    public.chmod(0o755)
    controller = Controller(tmp_path / "controller")
    controller.init(admin_socket=str(public / "controller.sock"), admin_group="adm",
                    admin_read_group="nogroup")  # fmt: skip
    shared_config = public / "controller.toml"
    try:
        controller.start()
        shutil.copy(controller.config_path, shared_config)
        shared_config.chmod(0o644)
        yield controller, shared_config
    finally:
        controller.stop()
        shutil.rmtree(public, ignore_errors=True)


def _as_nobody(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SYSTEM_PYTHON, "-m", "agent.cli", "ctl", "--controller-config", str(config), *args],
        capture_output=True, text=True, timeout=60, check=False, cwd="/tmp",
        user=NOBODY, group=NOBODY, extra_groups=[],
        env={"PYTHONPATH": f"{REPO}{os.pathsep}{SITE}", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_only_root_and_the_admin_group_change_the_fleet(
    shared_controller: tuple[Controller, Path],
) -> None:
    controller, config = shared_controller
    listed = _as_nobody(config, "nodes", "--json")
    assert listed.returncode == 0, listed.stderr
    for args in (
        ("token", "create", "--node-id", "node-x", "--ttl", "1h"),
        ("command-key", "rotate"),
    ):
        refused = _as_nobody(config, *args)
        assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
        assert "only root and members of the admin group (admin_group)" in refused.stderr
        assert f"uid {NOBODY}" in refused.stderr
    # Root may; the log names who did what, and who was refused.
    assert controller.token("node-y")
    events = [json.loads(line) for line in controller.log().splitlines() if line.startswith("{")]
    refused_calls = {e["call"] for e in events if e["event"] == "controller_admin_call_refused"}
    assert refused_calls == {"CreateToken", "RotateCommandKey"}
    calls = [(e["call"], e["uid"]) for e in events if e["event"] == "controller_admin_call"]
    assert ("CreateToken", 0) in calls
    assert all(e["pid"] > 0 for e in events if e["event"] == "controller_admin_call")
