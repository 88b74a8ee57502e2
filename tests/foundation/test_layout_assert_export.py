"""`layout assert|export|--clear` on a simulated 2-GPU H100 node, the mig-parted round trip
(apply -> export -> assert -> change -> assert -> apply the export), and the layout errors an
operator has to act on (docs/layouts.md)."""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.cli import build_parser
from agent.errors import LayoutError
from agent.hw.mig.parted import MigPartedEntry, dump_mig_parted, load_mig_parted
from agent.isolation.cgroups import hierarchy_mounts
from agent.sim.node import init_sim_node
from tests.support import RunningAgent, running_agent, wait_all_clean

MIXED = ["3g.40gb=1", "2g.20gb=1", "1g.10gb=2"]


def _instances(agent: RunningAgent, gpu: int) -> list[tuple[str, int]]:
    status = agent.cli_json("status")
    return sorted((i["profile"], i["placement_start"]) for i in status["gpus"][gpu]["instances"])


def _one_line_error(result: Any) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return str(lines[0])


# --- --clear: an empty layout only when asked for ---------------------------------------------


def test_no_profiles_is_refused_and_clear_removes_every_instance(agent: RunningAgent) -> None:
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=2")
    before_status = agent.cli_json("status")
    before_calls = agent.mutating_calls()
    for verb in ("apply", "plan", "assert"):
        result = agent.cli("layout", verb, "--gpu", "0")
        assert result.returncode == 2, (verb, result.stderr)
        line = _one_line_error(result)
        assert "PROFILE=COUNT" in line and "--clear" in line
    for wrong in (["--clear", "1g.10gb=1"], ["--clear", "--mig", "off"]):
        result = agent.cli("layout", "apply", "--gpu", "0", *wrong)
        assert result.returncode == 2, result.stderr
        assert "--clear" in _one_line_error(result)
    assert agent.mutating_calls() == before_calls
    assert agent.cli_json("status") == before_status

    plan = agent.cli_json("layout", "plan", "--gpu", "0", "--clear")["gpus"][0]
    assert [i["profile"] for i in plan["destroyed"]] == ["1g.10gb", "1g.10gb"]
    assert plan["created"] == [] and plan["noop"] is False
    assert agent.mutating_calls() == before_calls

    cleared = agent.cli_json("layout", "apply", "--gpu", "0", "--clear")["gpus"][0]
    assert len(cleared["destroyed"]) == 2
    assert _instances(agent, 0) == []
    gpu0 = agent.cli_json("status")["gpus"][0]
    assert gpu0["mig_mode"] == {"current": True, "pending": True}
    assert agent.cli("layout", "assert", "--gpu", "0", "--clear").returncode == 0


# --- assert -----------------------------------------------------------------------------------


def test_assert_answers_without_changing_anything(agent: RunningAgent) -> None:
    agent.cli_json("layout", "apply", "--gpu", "0", *MIXED)
    agent.cli_json("layout", "apply", "--gpu", "1", "7g.80gb=1")
    before_status = agent.cli_json("status")
    before_calls = agent.mutating_calls()

    same = agent.cli("layout", "assert", "--gpu", "0", *MIXED)
    assert same.returncode == 0, same.stderr
    assert same.stdout.splitlines() == ["GPU 0: matches"]
    # Order of PROFILE=COUNT and which placements the planner would pick do not matter.
    assert agent.cli("layout", "assert", "--gpu", "0", *reversed(MIXED)).returncode == 0

    differs = agent.cli("layout", "assert", "--gpu", "all", "3g.40gb=2")
    assert differs.returncode == 1, differs.stderr
    lines = differs.stdout.splitlines()
    assert lines[0] == "GPU 0: differs"
    assert "GPU 1: differs" in lines
    gpu0 = lines[1 : lines.index("GPU 1: differs")]
    assert sum(line.strip().startswith("create 3g.40gb") for line in gpu0) == 1
    assert sum(line.strip().startswith("destroy 1g.10gb") for line in gpu0) == 2
    assert sum(line.strip().startswith("destroy 2g.20gb") for line in gpu0) == 1

    document = json.loads(
        agent.cli("layout", "assert", "--gpu", "all", "3g.40gb=2", "--json").stdout
    )
    assert document["matches"] is False
    assert [(g["gpu_index"], g["matches"]) for g in document["gpus"]] == [(0, False), (1, False)]
    assert [i["profile"] for i in document["gpus"][1]["destroyed"]] == ["7g.80gb"]
    assert any(d.startswith("create 3g.40gb") for d in document["gpus"][1]["differences"])
    matching = agent.cli("layout", "assert", "--gpu", "1", "7g.80gb=1", "--json")
    assert matching.returncode == 0
    assert json.loads(matching.stdout)["matches"] is True

    assert agent.mutating_calls() == before_calls
    assert agent.cli_json("status") == before_status


def test_assert_reports_a_pending_mig_mode_change(agent: RunningAgent) -> None:
    assert agent.cli("layout", "assert", "--gpu", "1", "--mig", "off").returncode == 1
    agent.cli_json("layout", "apply", "--gpu", "1", "--mig", "off")
    before_calls = agent.mutating_calls()
    pending = agent.cli("layout", "assert", "--gpu", "1", "--mig", "off")
    assert pending.returncode == 1
    assert pending.stdout.splitlines()[0] == "GPU 1: differs"
    assert "reset" in pending.stdout
    # MIG on is what is in effect, but off is what the GPU is set to: not the layout asked for.
    mode_off = agent.cli("layout", "assert", "--gpu", "1", "--clear")
    assert mode_off.returncode == 1
    assert mode_off.stdout.splitlines() == [
        "GPU 1: differs",
        "  MIG mode on is not set (pending mode: off)",
    ]
    assert agent.mutating_calls() == before_calls
    assert agent.cli("sim", "reset-gpu", "--gpu", "1").returncode == 0
    assert agent.cli("layout", "assert", "--gpu", "1", "--mig", "off").returncode == 0


# --- export and the mig-parted round trip -----------------------------------------------------


def test_export_round_trips_through_apply_and_assert(agent: RunningAgent, tmp_path: Path) -> None:
    agent.cli_json("layout", "apply", "--gpu", "0", *MIXED)
    agent.cli_json("layout", "apply", "--gpu", "1", "7g.80gb=1")
    layout0, layout1 = _instances(agent, 0), _instances(agent, 1)

    exported = agent.cli("layout", "export")
    assert exported.returncode == 0, exported.stderr
    document = yaml.safe_load(exported.stdout)
    assert document == {
        "version": "v1",
        "mig-configs": {
            "current": [
                {
                    "devices": [0],
                    "mig-enabled": True,
                    "mig-devices": {"1g.10gb": 2, "2g.20gb": 1, "3g.40gb": 1},
                },
                {"devices": [1], "mig-enabled": True, "mig-devices": {"7g.80gb": 1}},
            ]
        },
    }
    path = tmp_path / "exported.yaml"
    path.write_text(exported.stdout)

    before_calls = agent.mutating_calls()
    assert agent.cli("layout", "assert", "-f", str(path), "-c", "current").returncode == 0
    assert agent.mutating_calls() == before_calls

    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=7")
    changed = agent.cli("layout", "assert", "-f", str(path), "-c", "current")
    assert changed.returncode == 1
    assert changed.stdout.splitlines()[0] == "GPU 0: differs"
    assert "GPU 1: matches" in changed.stdout.splitlines()

    agent.cli_json("layout", "apply", "-f", str(path), "-c", "current")
    assert agent.cli("layout", "assert", "-f", str(path), "-c", "current").returncode == 0
    # The same profiles come back; placements are the planner's to choose.
    assert [p for p, _ in _instances(agent, 0)] == [p for p, _ in layout0]
    assert _instances(agent, 1) == layout1


def test_export_groups_gpus_and_selects_them(agent: RunningAgent) -> None:
    agent.cli_json("layout", "apply", "--gpu", "all", "3g.40gb=2")
    both = yaml.safe_load(agent.cli("layout", "export", "--name", "all-3g").stdout)
    assert both["mig-configs"] == {
        "all-3g": [{"devices": [0, 1], "mig-enabled": True, "mig-devices": {"3g.40gb": 2}}]
    }
    one = agent.cli("layout", "export", "--gpu", "1", "-f", "mig-parted")
    assert yaml.safe_load(one.stdout)["mig-configs"]["current"][0]["devices"] == [1]
    missing = agent.cli("layout", "export", "--gpu", "5")
    assert missing.returncode == 4
    assert "GPU index 5 does not exist" in _one_line_error(missing)


def test_export_of_a_pending_mode_change_warns_and_exports_the_mode_to_come(
    agent: RunningAgent, tmp_path: Path
) -> None:
    agent.cli_json("layout", "apply", "--gpu", "1", "--mig", "off")
    exported = agent.cli("layout", "export", "--gpu", "1")
    assert exported.returncode == 0
    assert "pending until a GPU reset" in exported.stderr
    entry = yaml.safe_load(exported.stdout)["mig-configs"]["current"][0]
    assert entry == {"devices": [1], "mig-enabled": False, "mig-devices": {}}


def test_dump_reads_back_as_the_same_entries() -> None:
    entries = [
        MigPartedEntry((0, 2), (), True, {"1g.10gb": 7, "1g.10gb+me": 0}),
        MigPartedEntry("all", ("0x233010DE",), False, {}),
    ]
    for name in ("current", "my config", "naïve: [x]", "a\"b'c"):
        assert load_mig_parted(dump_mig_parted(name, entries), name) == entries
    with pytest.raises(LayoutError, match="plainer config name"):
        dump_mig_parted("a\u2028b", entries)


# --- mig-parted files with several configs ----------------------------------------------------

SEVERAL = """version: v1
mig-configs:
  wanted:
    - devices: all
      mig-enabled: true
      mig-devices: {"3g.40gb": 2}
  future:
    - devices: all
      mig-enabled: true
      some-newer-key: 1
"""


def test_an_unknown_key_in_another_config_does_not_block_the_selected_one() -> None:
    [entry] = load_mig_parted(SEVERAL, "wanted")
    assert entry.mig_devices == {"3g.40gb": 2}
    with pytest.raises(LayoutError) as raised:
        load_mig_parted(SEVERAL, "future")
    assert str(raised.value).startswith("mig-parted config 'future': ")
    assert "unknown key 'some-newer-key'" in str(raised.value)


def test_an_error_names_the_config_it_is_in() -> None:
    text = SEVERAL + "  broken:\n    - devices: [0]\n      mig-enabled: maybe\n"
    with pytest.raises(LayoutError) as raised:
        load_mig_parted(text, "wanted")
    message = str(raised.value)
    assert message.startswith("mig-parted config 'broken' (not the selected 'wanted'): ")
    assert "mig-configs.broken[0].mig-enabled" in message


def test_the_cli_applies_the_selected_config_of_a_file_with_a_newer_key(
    agent: RunningAgent, tmp_path: Path
) -> None:
    path = tmp_path / "several.yaml"
    path.write_text(SEVERAL)
    applied = agent.cli_json("layout", "apply", "-f", str(path), "-c", "wanted")
    assert [len(g["created"]) for g in applied["gpus"]] == [2, 2]
    refused = agent.cli("layout", "plan", "-f", str(path), "-c", "future")
    assert refused.returncode == 2
    assert "'future'" in _one_line_error(refused)


# --- no abbreviations -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["layout", "plan", "--gpu", "0", "--config", "x.toml", "1g.10gb=1"],
        ["layout", "plan", "-f", "mig.yaml", "--config", "mixed"],
        ["layout", "apply", "--gpu", "0", "--cl"],
        ["layout", "assert", "--gpu", "0", "--js", "1g.10gb=1"],
        ["layout", "export", "--na", "x"],
    ],
)
def test_layout_options_are_not_abbreviated(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(argv)
    assert raised.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


# --- a layout blocked by a lease --------------------------------------------------------------


@pytest.fixture
def tenant_parent() -> Iterator[Path]:
    """A cgroup to put tenants under, on whichever device hierarchy the machine has."""
    mounts = hierarchy_mounts("v2") or hierarchy_mounts("v1-devices")
    if not mounts:
        pytest.skip("this machine has no cgroup device hierarchy mounted")
    parent = mounts[0] / f"accelguard-test-{uuid.uuid4().hex[:8]}"
    parent.mkdir()
    try:
        yield parent
    finally:
        for directory in [*sorted(parent.rglob("*"), reverse=True), parent]:
            with contextlib.suppress(OSError):
                directory.rmdir()


@pytest.fixture
def lease_agent(tmp_path: Path, tenant_parent: Path) -> Iterator[RunningAgent]:
    node = init_sim_node(
        tmp_path / "node", "h100x2", cgroup_parents=[tenant_parent], slice_bytes=1 << 20
    )
    with running_agent(node) as running:
        yield running


def test_a_layout_blocked_by_a_lease_names_the_gpu_and_the_lease(
    lease_agent: RunningAgent, tenant_parent: Path
) -> None:
    agent = lease_agent
    agent.cli_json("layout", "apply", "--gpu", "1", "1g.10gb=2")
    wait_all_clean(agent)
    cgroup = tenant_parent / "tenant"
    cgroup.mkdir()
    grant = agent.cli_json(
        "lease", "grant", "--tenant", "alice", "--profile", "1g.10gb", "--cgroup", str(cgroup)
    )
    lease_id, partition = grant["lease"]["id"], grant["partition"]["uuid"]
    before_calls = agent.mutating_calls()
    for verb in ("plan", "apply", "assert"):
        result = agent.cli("layout", verb, "--gpu", "1", "7g.80gb=1")
        assert result.returncode == 2, (verb, result.stderr)
        line = _one_line_error(result)
        assert re.search(r"\bGPU 1\b", line), line
        assert f"held by lease {lease_id}" in line and partition in line
    assert agent.mutating_calls() == before_calls
    # A layout that keeps the leased instance goes through, and the message was not a guess.
    kept = agent.cli_json("layout", "apply", "--gpu", "1", "1g.10gb=1", "3g.40gb=1")["gpus"][0]
    assert partition in {i["uuid"] for i in kept["kept"]}
