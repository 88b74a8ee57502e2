"""A scrub that hangs, dies or finds a mismatch quarantines; nothing unverified is called clean."""

from __future__ import annotations

import re

import pytest

from agent.runtime.failpoints import ENVIRONMENT_VARIABLE, CrashPoint, Fault
from tests.support import RunningAgent, wait_settled

FAULTS = [
    (Fault.SCRUB_WORKER_HANG, r"hung past its 2s deadline and was killed"),
    (CrashPoint.SCRUB_WORKER_CRASH, r"was killed by signal 9"),
    (Fault.SCRUB_CORRUPT_AFTER_WRITE, r"did not verify: 1 bytes differ"),
]
# tests/foundation/test_failpoints.py checks that every failpoint has a test.
COVERED = frozenset(fault for fault, _ in FAULTS)


@pytest.mark.parametrize(("fault", "reason"), FAULTS)
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
