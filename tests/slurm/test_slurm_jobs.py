"""accelguard around real Slurm jobs (issue: Slurm integration): fences, no residue between
jobs, drains with accelguard's reason, strays evicted, an agent killed mid-Epilog.

Jobs run as an unprivileged user through srun on a real slurmd whose Prolog, Epilog and SPANK
plugin are accelguard's; the GPU is simulated (an H100 with two 3g.40gb instances), the kernel's
cgroup device checks are real: open() is ENXIO for a node the job's fence allows and EPERM for
one it denies.
"""

from __future__ import annotations

import errno
import signal
import subprocess
from typing import Any

from agent.runtime.failpoints import ENVIRONMENT_VARIABLE, CrashPoint, Fault
from tests.leases.helpers import reap
from tests.slurm.conftest import ACCELGUARD as ACCELGUARD_SCRIPT
from tests.slurm.conftest import SlurmCluster
from tests.support import ACCELGUARD, wait_settled

SECRET = "job-one-weights-0xC0FFEE"


def _ok(result: Any) -> dict[str, Any]:
    assert isinstance(result, dict), f"srun failed: {result.stdout}\n{result.stderr}"
    return result


def _lease_of(cluster: SlurmCluster, job: str) -> dict[str, Any]:
    leases = cluster.agent.cli_json("lease", "list", "--all")["leases"]
    [lease] = [lease for lease in leases if lease["tenant"] == f"job:{job}"]
    return lease


def _restart_agent(cluster: SlurmCluster, env: dict[str, str] | None = None) -> None:
    cluster.agent.stop(signal.SIGTERM)
    cluster.agent.start(env=env)


def test_a_job_is_fenced_to_its_partition_and_leaves_nothing_behind(
    slurm: SlurmCluster,
) -> None:
    first = _ok(slurm.job(1, "write", SECRET))
    # Its own MIG instance's nodes (and the shared ones) open, every other GPU and capability
    # node of the node is denied by the kernel.
    allowed = sorted(path for path, code in first["probe"].items() if code == errno.ENXIO)
    denied = [path for path, code in first["probe"].items() if code == errno.EPERM]
    assert len(first["partitions"]) == 1 and first["uid"] != 0
    [mine] = first["partitions"]
    lease = _lease_of(slurm, first["job"])
    assert lease["partition_uuid"] == mine
    partition = next(p for p in slurm.agent.partitions() if p["uuid"] == mine)
    nvidia_nodes = [n for n in partition["device_nodes"] if "/nvidia" in n]
    assert allowed == sorted(nvidia_nodes)
    assert len(denied) == len(first["probe"]) - len(allowed) > 100
    # The lease was bound to the job's cgroup by the Prolog, before the job started.
    assert lease["cgroup"].endswith(
        f"/slurm_{slurm.node_name}/uid_{first['uid']}/job_{first['job']}"
    )

    slurm.wait_idle()
    # The next job gets both instances and finds nothing of the first job's secret.
    second = _ok(slurm.job(2, "read", SECRET))
    assert len(second["partitions"]) == 2 and second["found"] == 0
    # The scrub between them is certified, naming the first job.
    certificates = slurm.agent.cli_json("scrub", "certs", "--partition", mine)["certificates"]
    named = [c["payload"] for c in certificates if c["payload"]["previous_tenant"]]
    assert named[0]["previous_tenant"] == f"job:{first['job']}"
    assert named[0]["verified"] is True
    assert slurm.node_state()[1] == ""  # never drained


def test_a_failed_scrub_drains_the_node_and_the_prolog_refuses_the_partition(
    slurm: SlurmCluster,
) -> None:
    _restart_agent(slurm, {ENVIRONMENT_VARIABLE: Fault.SCRUB_CORRUPT_AFTER_WRITE})
    job = _ok(slurm.job(1, "probe"))
    [dirty] = job["partitions"]
    slurm.wait_idle()
    state, reason = slurm.node_state()
    assert "DRAIN" in state and reason.startswith("accelguard: epilog of job"), (state, reason)
    assert "did not verify" in reason
    [record] = [p for p in slurm.agent.partitions() if p["uuid"] == dirty]
    assert record["state"] == "quarantined"

    # The operator resumes the node without clearing the partition: no job gets it.
    _restart_agent(slurm)
    slurm.resume()
    refused = slurm.job(2, "probe")
    assert isinstance(refused, subprocess.CompletedProcess) and not refused.stdout.strip()
    state, reason = slurm.node_state()
    assert "DRAIN" in state and "quarantined" in reason, (state, reason)
    leases = slurm.agent.cli_json("lease", "list")["leases"]
    assert leases == []  # the other partition, taken by that Prolog, was given back
    # Cleared (scrubbed again) and resumed, the node runs jobs on it again.
    slurm.agent.cli_json("partition", "clear", dirty, "--reason", "checked")
    slurm.scontrol("update", f"nodename={slurm.node_name}", "state=resume")
    _ok(slurm.job(2, "probe"))


def test_a_stray_holding_the_partition_after_the_job_is_evicted_by_the_epilog(
    slurm: SlurmCluster,
) -> None:
    sleeper = slurm.job_in_background(1, "sleep", "4")
    lease = slurm.wait_for_lease()
    # A process outside the job (not in its cgroup, so Slurm does not end it) holds the
    # partition; NVML lists it on the instance, so the Epilog's eviction may kill it.
    stray = subprocess.Popen(
        [*ACCELGUARD, "--config", str(slurm.agent.config_path), "sim", "hold",
         "--partition", lease["partition_uuid"]],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert stray.stdout is not None and "holding" in stray.stdout.readline()
    assert sleeper.wait(timeout=120) == 0
    slurm.wait_idle()
    assert reap(stray) < 0  # killed by the eviction, not exited on its own
    [record] = [p for p in slurm.agent.partitions() if p["uuid"] == lease["partition_uuid"]]
    assert record["state"] == "free" and record["clean"] is True
    assert slurm.node_state()[1] == ""


def test_the_agent_killed_during_an_epilog_drains_and_recovers_safely(
    slurm: SlurmCluster,
) -> None:
    _restart_agent(slurm, {ENVIRONMENT_VARIABLE: CrashPoint.LEASE_RELEASE_AFTER_REVOKE})
    job = _ok(slurm.job(1, "probe"))
    assert slurm.agent.wait_exit(timeout=120) == -signal.SIGKILL
    slurm.wait_idle()
    state, reason = slurm.node_state()
    assert "DRAIN" in state and reason.startswith("accelguard: epilog of job"), (state, reason)
    slurm.agent.start()
    for partition in wait_settled(slurm.agent):
        assert partition["state"] in ("free", "quarantined")
        assert partition["state"] != "free" or partition["clean"], partition
    assert _lease_of(slurm, job["job"])["state"] == "released"


def test_the_spank_plugin_fails_a_step_it_cannot_check(slurm: SlurmCluster) -> None:
    """The plugin runs `accelguard slurm bind` at each task's fork; when that fails (here: a
    plugin pointed at /bin/false), the step fails instead of running unchecked."""
    plugstack = slurm.root / "plugstack.conf"
    good = plugstack.read_text()
    plugstack.write_text(good.replace(f"accelguard={ACCELGUARD_SCRIPT}", "accelguard=/bin/false"))
    try:
        failed = slurm.job(1, "probe")
        # The task never ran (srun says slurmstepd could not exec it).
        assert isinstance(failed, subprocess.CompletedProcess) and not failed.stdout.strip()
        slurmd_log = (slurm.root / "log" / "slurmd.log").read_text()
        assert "accelguard: binding job" in slurmd_log
    finally:
        plugstack.write_text(good)
    slurm.wait_idle()
    _ok(slurm.job(1, "probe"))  # and with the real one, it runs
