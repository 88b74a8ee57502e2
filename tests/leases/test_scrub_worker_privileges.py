"""The scrub worker keeps none of the agent's capabilities (CAP_MKNOD aside, for
nvidia-modprobe) and can never gain one (no_new_privs): it only writes and reads memory.
Checked on a real worker process, held in its scrub by the ``scrub.worker_hang`` failpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agent.runtime.failpoints import ENVIRONMENT_VARIABLE, Fault
from agent.sim.node import init_sim_node
from tests.link.support import wait_for
from tests.support import REPO, running_agent, wait_all_clean

COVERED = frozenset([Fault.SCRUB_WORKER_HANG])
CAP_MKNOD = 27


def _workers() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"agent.scrub.worker" in command:
            found.append(int(entry.name))
    return found


def _status(pid: int) -> dict[str, str]:
    lines = (Path("/proc") / str(pid) / "status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def test_the_scrub_worker_runs_without_the_agents_capabilities(
    tmp_path: Path, cgroup_parents: dict[str, Path]
) -> None:
    node = init_sim_node(tmp_path / "node", "h100x1", cgroup_parents=list(cgroup_parents.values()),
                         mig_enabled=False, slice_bytes=1 << 20)  # fmt: skip
    with running_agent(node) as agent:
        partition = wait_all_clean(agent)[0]["uuid"]
        agent.cli_json("partition", "quarantine", partition, "--reason", "check the worker")
        agent.stop()
        agent.start(env={ENVIRONMENT_VARIABLE: Fault.SCRUB_WORKER_HANG.value})
        clearing = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "--config", str(agent.config_path), "partition",
             "clear", partition, "--reason", "checked"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            pid = wait_for(lambda: (_workers() or [None])[0], "the scrub worker")

            def dropped() -> dict[str, str] | None:
                # The worker drops them first thing after it starts (and then hangs for ever).
                status = _status(pid)
                done = (
                    status["NoNewPrivs"].strip() == "1"
                    and int(status["CapPrm"], 16) & ~(1 << CAP_MKNOD) == 0
                )
                return status if done else None

            status = wait_for(dropped, "the worker without capabilities", timeout=30)
            agent_status = _status(agent.process.pid)  # type: ignore[union-attr]
            for field in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
                assert int(status[field], 16) & ~(1 << CAP_MKNOD) == 0, (field, status[field])
            # The agent itself still has its capabilities (root in the test: all of them).
            assert int(agent_status["CapEff"], 16) & ~(1 << CAP_MKNOD) != 0
        finally:
            clearing.kill()
            clearing.wait()
