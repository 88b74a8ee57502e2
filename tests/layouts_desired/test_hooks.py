"""[layout] before_apply / after_apply: run only around an apply that changes something, as argv
lists with a clean environment that says what happens, killed at their timeout; a before_apply
failure changes nothing, an after_apply failure leaves the layout applied and says so."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from agent.config import ConfigError, parse_config
from tests.layouts_desired.conftest import (
    configure_layout,
    desired,
    log_events,
    outside,
    profiles,
    restart,
    start_up_outcomes,
)
from tests.support import RunningAgent, wait_until

# Writes its environment to $1 (sorted), says hello on both streams, then does what the files
# beside $1 tell it: "<phase>.exit" holds an exit status, "<phase>.hang" makes it sleep (in a
# child, as a real script's command would) after writing the shell's and the child's pids.
HOOK = """#!/bin/sh
env | sort > "$1"
echo "hello from $ACCELGUARD_LAYOUT_PHASE"
echo "to stderr from $ACCELGUARD_LAYOUT_PHASE" >&2
dir=$(dirname "$1")
if [ -e "$dir/$ACCELGUARD_LAYOUT_PHASE.hang" ]; then
    sleep 600 &
    echo "$$ $!" > "$dir/$ACCELGUARD_LAYOUT_PHASE.pids"
    wait
fi
if [ -e "$dir/$ACCELGUARD_LAYOUT_PHASE.exit" ]; then
    echo "refusing: clients still running"
    exit "$(cat "$dir/$ACCELGUARD_LAYOUT_PHASE.exit")"
fi
"""


@pytest.fixture
def hooked(agent: RunningAgent, tmp_path: Path) -> Path:
    """The agent restarted with both hooks set; returns the directory the hooks write to."""
    out = tmp_path / "hooks"
    out.mkdir()
    script = tmp_path / "hook.sh"
    script.write_text(HOOK)
    script.chmod(0o755)
    configure_layout(
        agent,
        before_apply=[str(script), str(out / "before_apply.env")],
        after_apply=[str(script), str(out / "after_apply.env")],
        hook_timeout_s=2.0,
    )
    restart(agent)
    return out


def _env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def _ran(out: Path) -> list[str]:
    return sorted(p.stem for p in out.glob("*.env"))


def _clear(out: Path) -> None:
    for path in out.iterdir():
        path.unlink()


def test_hooks_run_around_a_change_and_are_told_what_happens(
    agent: RunningAgent, hooked: Path
) -> None:
    applied = agent.cli_json("layout", "apply", "--gpu", "1", "1g.10gb=2")
    assert _ran(hooked) == ["after_apply", "before_apply"]
    uuid1 = agent.cli_json("status")["gpus"][1]["uuid"]
    before, after = _env(hooked / "before_apply.env"), _env(hooked / "after_apply.env")
    assert before["ACCELGUARD_LAYOUT_PHASE"] == "before_apply"
    assert after["ACCELGUARD_LAYOUT_PHASE"] == "after_apply"
    for env in (before, after):
        assert env["ACCELGUARD_LAYOUT_GPUS"] == "1"
        assert env["ACCELGUARD_LAYOUT_GPU_UUIDS"] == uuid1
        assert env["ACCELGUARD_LAYOUT_ORIGIN"] == "admin"
        assert env["ACCELGUARD_LAYOUT_REQUESTED_BY"].startswith("admin uid 0")
        assert env["ACCELGUARD_NODE_ID"] == agent.config.node.id
        # A clean environment: nothing of the agent's own (its failpoints, Python paths, ...).
        assert not {"HOME", "PYTHONPATH", "VIRTUAL_ENV", "ACCELGUARD_FAILPOINTS"} & set(env)
        assert env["PATH"].startswith("/usr/local/sbin:")
    assert "ACCELGUARD_LAYOUT_RESULT" not in before
    assert after["ACCELGUARD_LAYOUT_RESULT"] == "applied"
    assert [(h["phase"], h["ok"], h["exit_code"]) for h in applied["hooks"]] == [
        ("before_apply", True, 0),
        ("after_apply", True, 0),
    ]
    assert "hello from before_apply" in applied["hooks"][0]["output"]
    assert "to stderr from before_apply" in applied["hooks"][0]["output"]
    finished = [e for e in log_events(agent) if e.get("event") == "layout_hook_finished"]
    assert [e["phase"] for e in finished] == ["before_apply", "after_apply"]
    assert "hello from after_apply" in finished[1]["output"]

    # The same layout again changes nothing: no hook runs.
    _clear(hooked)
    again = agent.cli_json("layout", "apply", "--gpu", "1", "1g.10gb=2")
    assert again["hooks"] == [] and again["gpus"][0]["noop"] is True
    assert _ran(hooked) == []
    # A plan never runs one.
    agent.cli_json("layout", "plan", "--gpu", "1", "7g.80gb=1")
    assert _ran(hooked) == []


def test_a_failing_before_hook_refuses_the_apply_and_changes_nothing(
    agent: RunningAgent, hooked: Path
) -> None:
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=2")
    before_status = agent.cli_json("status")
    before_desired = agent.cli_json("layout", "desired")
    before_calls = agent.mutating_calls()
    _clear(hooked)
    (hooked / "before_apply.exit").write_text("3")
    refused = agent.cli("layout", "apply", "--gpu", "0", "7g.80gb=1")
    assert refused.returncode == 2, refused.stderr
    message = refused.stderr.strip()
    assert "before_apply hook" in message and "exited 3" in message
    assert "clients still running" in message and "nothing was changed" in message
    assert _ran(hooked) == ["before_apply"], "after_apply ran for an apply that never began"
    assert agent.mutating_calls() == before_calls
    assert agent.cli_json("status") == before_status
    assert agent.cli_json("layout", "desired") == before_desired


def test_a_hook_past_its_timeout_is_killed_with_its_children(
    agent: RunningAgent, hooked: Path
) -> None:
    before_calls = agent.mutating_calls()
    (hooked / "before_apply.hang").write_text("")
    refused = agent.cli("layout", "apply", "--gpu", "0", "1g.10gb=1")
    assert refused.returncode == 2, refused.stderr
    assert "did not finish within 2s" in refused.stderr and "killed" in refused.stderr
    shell, child = (int(pid) for pid in (hooked / "before_apply.pids").read_text().split())

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"

    wait_until(lambda: gone(shell) and gone(child), "the hook and its child killed", timeout=30)
    assert agent.mutating_calls() == before_calls
    assert profiles(agent, 0) == Counter()


def test_a_failing_after_hook_is_reported_and_the_layout_stays(
    agent: RunningAgent, hooked: Path
) -> None:
    (hooked / "after_apply.exit").write_text("5")
    result = agent.cli("layout", "apply", "--gpu", "0", "3g.40gb=2", "--json")
    assert result.returncode == 1, result.stderr
    assert "after_apply hook" in result.stderr and "exited 5" in result.stderr
    assert "the layout was applied and stays" in result.stderr
    document = json.loads(result.stdout)
    assert [(h["phase"], h["ok"]) for h in document["hooks"]] == [
        ("before_apply", True),
        ("after_apply", False),
    ]
    assert profiles(agent, 0) == Counter({"3g.40gb": 2})
    assert desired(agent)[0]["counts"] == {"3g.40gb": 2}
    assert _env(hooked / "after_apply.env")["ACCELGUARD_LAYOUT_RESULT"] == "applied"


def test_hooks_run_at_start_up_only_when_it_changes_something(
    agent: RunningAgent, hooked: Path
) -> None:
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=2")
    gi = agent.cli_json("status")["gpus"][0]["instances"][0]["gpu_instance_id"]
    _clear(hooked)
    agent.stop()
    outside(agent, "destroy", "0", str(gi))
    agent.start()
    [event] = start_up_outcomes(agent, 1).values()
    assert event["outcome"] == "applied"
    assert _ran(hooked) == ["after_apply", "before_apply"]
    assert _env(hooked / "before_apply.env")["ACCELGUARD_LAYOUT_ORIGIN"] == "start-up"
    assert _env(hooked / "before_apply.env")["ACCELGUARD_LAYOUT_REQUESTED_BY"] == "agent"
    assert profiles(agent, 0) == Counter({"1g.10gb": 2})

    _clear(hooked)
    restart(agent)
    [event] = start_up_outcomes(agent, 1).values()
    assert event["outcome"] == "matches"
    assert _ran(hooked) == []


def test_a_start_up_before_hook_failure_leaves_the_gpu_and_reports_it(
    agent: RunningAgent, hooked: Path
) -> None:
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=2")
    gi = agent.cli_json("status")["gpus"][0]["instances"][0]["gpu_instance_id"]
    agent.stop()
    outside(agent, "destroy", "0", str(gi))
    (hooked / "before_apply.exit").write_text("7")
    before_calls = agent.mutating_calls()
    agent.start()
    [event] = start_up_outcomes(agent, 1).values()
    assert event["outcome"] == "failed" and "exited 7" in event["detail"]
    assert agent.mutating_calls() == before_calls
    assert profiles(agent, 0) == Counter({"1g.10gb": 1})
    assert desired(agent)[0]["outcome"] == "failed"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (["stop-gpu-clients"], "absolute path"),
        (["./stop"], "absolute path"),
        ("/usr/local/bin/stop", "expected a list"),
        (["/bin/true", 3], "expected a string"),
        (["/bin/true", "a\x00b"], "NUL"),
    ],
)
def test_hook_settings_are_checked(value: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=r"layout\.before_apply") as refused:
        parse_config({"layout": {"before_apply": value}})
    assert fragment in str(refused.value)
    for timeout in (0, -1, 4000):
        with pytest.raises(ConfigError, match=r"layout\.hook_timeout_s"):
            parse_config({"layout": {"hook_timeout_s": timeout}})
    config = parse_config({"layout": {"before_apply": ["/usr/local/bin/stop", "--all"]}})
    assert config.layout.before_apply == ["/usr/local/bin/stop", "--all"]
    assert config.layout.after_apply == [] and config.layout.reapply_at_start is True


def test_a_missing_hook_refuses_the_apply(agent: RunningAgent, tmp_path: Path) -> None:
    configure_layout(agent, before_apply=[str(tmp_path / "not-installed")])
    restart(agent)
    before_calls = agent.mutating_calls()
    refused = agent.cli("layout", "apply", "--gpu", "0", "1g.10gb=1")
    assert refused.returncode == 2
    assert "cannot run" in refused.stderr and "not-installed" in refused.stderr
    assert agent.mutating_calls() == before_calls
    assert agent.cli("status").returncode == 0, "the agent is still up"
