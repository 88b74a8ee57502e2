"""The daemon and CLI end to end on a simulated 2-GPU H100 node (pynvml drives nvml-sim)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.store import Store
from tests.support import RunningAgent, run_cli, wait_all_clean

MIXED = ["3g.40gb=1", "2g.20gb=1", "1g.10gb=2"]


def _profiles(status: dict[str, Any], gpu: int) -> list[tuple[str, int]]:
    return sorted((i["profile"], i["placement_start"]) for i in status["gpus"][gpu]["instances"])


def test_status_reports_the_simulated_node(agent: RunningAgent) -> None:
    status = agent.cli_json("status")
    assert [g["name"] for g in status["gpus"]] == ["NVIDIA H100 80GB HBM3"] * 2
    assert [g["index"] for g in status["gpus"]] == [0, 1]
    assert all(g["uuid"].startswith("GPU-") for g in status["gpus"])
    assert all(g["mig_mode"] == {"current": True, "pending": True} for g in status["gpus"])
    assert status["partitions"] == []
    mode = stat.S_IMODE(Path(agent.config.admin.socket).stat().st_mode)
    assert mode == 0o660


def test_apply_mixed_layout_then_reapply_is_a_noop(agent: RunningAgent) -> None:
    applied = agent.cli_json("layout", "apply", "--gpu", "0", *MIXED)
    [gpu0] = applied["gpus"]
    assert sorted(i["profile"] for i in gpu0["created"]) == [
        "1g.10gb",
        "1g.10gb",
        "2g.20gb",
        "3g.40gb",
    ]
    assert all(i["uuid"].startswith("MIG-") for i in gpu0["created"])
    agent.cli_json("layout", "apply", "--gpu", "1", "7g.80gb=1")

    status = agent.cli_json("status")
    assert [p for p, _ in _profiles(status, 0)] == ["1g.10gb", "1g.10gb", "2g.20gb", "3g.40gb"]
    assert _profiles(status, 1) == [("7g.80gb", 0)]
    partitions = status["partitions"]
    assert len(partitions) == 5
    # New instances start dirty and become clean only through a verified scrub.
    wait_all_clean(agent)
    store = Store(agent.config.node.store_path)
    try:
        scrubbed = {
            row[0]
            for row in store._db.execute("SELECT partition_uuid FROM scrubs WHERE verified = 1")
        }
    finally:
        store.close()
    assert {p["uuid"] for p in partitions} <= scrubbed
    caps = [n for p in partitions for n in p["device_nodes"] if "nvidia-caps" in n]
    assert len(caps) == 10 and len(set(caps)) == 10

    before = agent.mutating_calls()
    again = agent.cli_json("layout", "apply", "--gpu", "0", *MIXED)
    assert again["gpus"][0]["noop"] is True
    assert again["gpus"][0]["created"] == [] and again["gpus"][0]["destroyed"] == []
    assert agent.mutating_calls() == before
    assert agent.cli_json("status")["gpus"] == status["gpus"]


def test_changing_a_layout_keeps_what_fits(agent: RunningAgent) -> None:
    agent.cli_json("layout", "apply", "--gpu", "0", "3g.40gb=2")
    kept_uuids = {i["uuid"] for i in agent.cli_json("status")["gpus"][0]["instances"]}
    changed = agent.cli_json("layout", "apply", "--gpu", "0", "3g.40gb=1", "1g.10gb=3")["gpus"][0]
    assert len(changed["kept"]) == 1 and len(changed["destroyed"]) == 1
    assert changed["kept"][0]["uuid"] in kept_uuids
    assert sorted(i["profile"] for i in changed["created"]) == ["1g.10gb"] * 3


def test_plan_changes_nothing(agent: RunningAgent) -> None:
    before = agent.mutating_calls()
    plan = agent.cli_json("layout", "plan", "--gpu", "all", "1g.10gb=7")
    assert [len(g["created"]) for g in plan["gpus"]] == [7, 7]
    assert agent.mutating_calls() == before
    assert all(g["instances"] == [] for g in agent.cli_json("status")["gpus"])


def test_mig_parted_file(agent: RunningAgent, tmp_path: Path) -> None:
    config = tmp_path / "mig.yaml"
    config.write_text(
        "version: v1\n"
        "mig-configs:\n"
        "  all-1g.10gb:\n"
        "    - devices: all\n"
        "      mig-enabled: true\n"
        "      mig-devices:\n"
        '        "1g.10gb": 7\n'
        "  mixed:\n"
        "    - devices: [0]\n"
        "      mig-enabled: true\n"
        '      mig-devices: {"3g.40gb": 1, "4g.40gb": 1}\n'
        "    - devices: [1]\n"
        "      mig-enabled: true\n"
        '      mig-devices: {"7g.80gb": 1}\n'
    )
    applied = agent.cli_json("layout", "apply", "-f", str(config), "-c", "mixed")
    assert [len(g["created"]) for g in applied["gpus"]] == [2, 1]
    status = agent.cli_json("status")
    assert _profiles(status, 0) == [("3g.40gb", 4), ("4g.40gb", 0)]


def test_mig_mode_change_is_reported_pending_not_hidden(agent: RunningAgent) -> None:
    result = agent.cli_json("layout", "apply", "--gpu", "1", "--mig", "off")["gpus"][0]
    assert "reset" in result["note"]
    gpu1 = agent.cli_json("status")["gpus"][1]
    assert gpu1["mig_mode"] == {"current": True, "pending": False}
    assert gpu1["reset_required"] is True
    human = agent.cli("status").stdout
    assert "GPU reset required" in human
    # The reset is the operator's step (simulated here); then the whole GPU is a partition,
    # dirty until scrubbed.
    assert agent.cli("sim", "reset-gpu", "--gpu", "1").returncode == 0
    gpu1 = agent.cli_json("status")["gpus"][1]
    assert gpu1["mig_mode"] == {"current": False, "pending": False}
    whole = [p for p in wait_all_clean(agent) if p["kind"] == "gpu"]
    assert [p["uuid"] for p in whole] == [gpu1["uuid"]]
    assert whole[0]["device_nodes"][-1].endswith("/nvidia1")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--gpu", "0", "5g.50gb=1"], "5g.50gb"),
        (["--gpu", "0", "7g.80gb=2"], "7g.80gb"),
        (["--gpu", "0", "3g.40gb=2", "1g.10gb=1"], "3g.40gb"),
        (["--gpu", "7", "1g.10gb=1"], "GPU index 7 does not exist"),
        (["--gpu", "0", "1g.10gb=x"], "1g.10gb=x"),
        (["--gpu", "zero", "1g.10gb=1"], "--gpu"),
        (["1g.10gb=1"], "--gpu"),
    ],
)
def test_bad_layout_input_is_one_line_and_changes_nothing(
    agent: RunningAgent, args: list[str], fragment: str
) -> None:
    agent.cli_json("layout", "apply", "--gpu", "0", "2g.20gb=1")
    # Settled first: a scrub finishing meanwhile would change the status by itself.
    wait_all_clean(agent)
    before_status = agent.cli_json("status")
    before_calls = agent.mutating_calls()
    result = agent.cli("layout", "apply", *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr
    assert agent.mutating_calls() == before_calls
    assert agent.cli_json("status") == before_status


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("version: v2\nmig-configs: {}\n", "version"),
        (
            "version: v1\nmig-configs:\n  x:\n    - devices: all\n      mig-enabled: maybe\n",
            "mig-enabled",
        ),
        ("{{{{", "YAML"),
        ("version: v1\nmig-configs:\n  other: []\n", "mixed"),
    ],
)
def test_malformed_mig_parted_file_is_refused(
    agent: RunningAgent, tmp_path: Path, text: str, fragment: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    before_calls = agent.mutating_calls()
    result = agent.cli("layout", "apply", "-f", str(path), "-c", "mixed")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment.lower() in lines[0].lower()
    assert agent.mutating_calls() == before_calls


def test_cli_without_daemon_is_a_clear_error(sim_node: Any) -> None:
    result = run_cli("status", config=sim_node.config_path)
    assert result.returncode == 1
    assert "is `accelguard agent` running?" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_status_json_is_one_document(agent: RunningAgent) -> None:
    result = agent.cli("status", "--json")
    assert isinstance(json.loads(result.stdout), dict)
