"""A scrub that hangs, dies or finds a mismatch quarantines; nothing unverified is called clean."""

from __future__ import annotations

import re

import pytest

from agent.failpoints import ENVIRONMENT_VARIABLE
from tests.support import RunningAgent, wait_settled


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("scrub.worker_hang", r"hung past its 2s deadline and was killed"),
        ("scrub.worker_crash", r"was killed by signal 9"),
        ("scrub.corrupt_after_write", r"did not verify: 1 bytes differ"),
    ],
)
def test_failed_scrub_quarantines_with_reason(agent: RunningAgent, fault: str, reason: str) -> None:
    agent.stop()
    toml = agent.config_path.read_text().replace("deadline_s = 60.0", "deadline_s = 2.0")
    agent.config_path.write_text(toml)
    agent.start(env={ENVIRONMENT_VARIABLE: fault})
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=1")
    [partition] = wait_settled(agent)
    assert partition["state"] == "quarantined"
    assert partition["clean"] is False
    assert re.search(reason, partition["reason"]), partition["reason"]
    assert partition["uuid"] in agent.cli("partition", "list").stdout
    assert "partition_quarantined" in agent.log()
    # Quarantine holds across a restart, and only a successful scrub ends it.
    agent.stop()
    agent.start()
    [still] = agent.cli_json("partition", "list")["partitions"]
    assert still["state"] == "quarantined"
    cleared = agent.cli_json("partition", "clear", partition["uuid"], "--reason", "fixed")
    assert cleared["state"] == "free" and cleared["clean"] is True
