"""A real single-node Slurm (Debian's slurmctld, slurmd, munged; no systemd) over a simulated
GPU node with its accelguard agent, the Prolog, Epilog and SPANK plugin of docs/slurm.md.

Everything lives under one world-traversable temporary directory (jobs run as an unprivileged
user), on ports and a Slurm node name of its own, so xdist workers may each run a cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.isolation.cgroups import hierarchy_mounts
from agent.sim import workload
from agent.sim.node import SimNode, init_sim_node
from tests.support import REPO, RunningAgent, wait_all_clean

JOB_USER = "accelguard-job"
SPANK = REPO / "native" / "slurm-spank" / "build" / "accelguard_spank.so"
JOB_SCRIPT = Path(__file__).with_name("job.py")
ACCELGUARD = Path(sys.executable).with_name("accelguard")


def _missing() -> str | None:
    for tool in ("slurmctld", "slurmd", "srun", "scontrol", "munged"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: slurmd slurmctld slurm-client munge)"
    if not hierarchy_mounts("v1-devices"):
        # Slurm 22.05 picks cgroup/v2 on a unified host, which wants systemd to delegate its
        # scope; these tests run cgroup/v1 (docs/slurm.md, "cgroup v2").
        return "no cgroup v1 devices hierarchy: Slurm's cgroup/v2 plugin needs systemd"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ensure_job_user() -> int:
    found = subprocess.run(["id", "-u", JOB_USER], capture_output=True, text=True, check=False)
    if found.returncode != 0:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", JOB_USER],
            capture_output=True, check=False,
        )  # fmt: skip
        found = subprocess.run(["id", "-u", JOB_USER], capture_output=True, text=True, check=True)
    return int(found.stdout)


@dataclass
class SlurmCluster:
    root: Path
    node_name: str
    agent: RunningAgent
    env: dict[str, str]
    daemons: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def cgroup_root(self) -> Path:
        return hierarchy_mounts("v1-devices")[0] / f"slurm_{self.node_name}"

    def scontrol(self, *args: str) -> str:
        result = subprocess.run(
            ["scontrol", *args], env=self.env, capture_output=True, text=True, timeout=30,
            check=True,
        )  # fmt: skip
        return result.stdout

    def node_state(self) -> tuple[str, str]:
        """(state, reason) of the Slurm node, e.g. ("IDLE", "") or ("IDLE+DRAIN", "...")."""
        text = self.scontrol("show", "node", self.node_name, "--oneliner")
        fields = dict(item.split("=", 1) for item in text.split() if "=" in item)
        reason = text.split("Reason=", 1)[1].strip() if "Reason=" in text else ""
        return fields.get("State", ""), reason

    def resume(self) -> None:
        self.scontrol("update", f"nodename={self.node_name}", "state=resume")

    def job(self, gpus: int, verb: str, *extra: str, timeout: float = 120) -> Any:
        """Run job.py as the job user through srun; its JSON, or the failed srun."""
        command = [
            "runuser", "-u", JOB_USER, "--", "srun", f"--gres=gpu:3g.40gb:{gpus}",
            "--job-name", f"t-{verb}", "python3", str(JOB_SCRIPT), str(self.root / "map.json"),
            verb, *extra,
        ]  # fmt: skip
        result = subprocess.run(
            command, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        lines = result.stdout.strip().splitlines()
        if result.returncode != 0 or not lines:
            # No output: the task never ran (srun may still exit 0 when it could not exec).
            result.stderr += f"\nSlurm node: {self.node_state()}"
            return result
        return json.loads(lines[-1])

    def job_in_background(self, gpus: int, verb: str, *extra: str) -> subprocess.Popen[str]:
        command = [
            "runuser", "-u", JOB_USER, "--", "srun", f"--gres=gpu:3g.40gb:{gpus}",
            "python3", str(JOB_SCRIPT), str(self.root / "map.json"), verb, *extra,
        ]  # fmt: skip
        return subprocess.Popen(
            command, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
        )

    def wait_for_lease(self, timeout: float = 60) -> dict[str, Any]:
        """The first live lease of a job (its Prolog has run)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leases = self.agent.cli_json("lease", "list")["leases"]
            bound = [lease for lease in leases if lease["tenant"].startswith("job:")]
            if bound:
                return dict(bound[0])
            time.sleep(0.1)
        raise AssertionError("no job lease appeared")

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state, _ = self.node_state()
            if state.startswith("IDLE") and "COMPLETING" not in state:
                return
            time.sleep(0.2)
        raise AssertionError(f"Slurm node never idle: {self.node_state()}")

    def write_map(self) -> None:
        """Nodes and per-partition memory ranges for job.py, from accelguard's own mapping."""
        config = load_config(self.agent.config_path)
        dev = config.devices.dev_root
        nodes = sorted(str(p) for p in dev.iterdir() if p.name.startswith("nvidia") and
                       not p.is_dir())  # fmt: skip
        nodes += sorted(str(p) for p in (dev / "nvidia-caps").iterdir())
        partitions = {}
        for partition in self.agent.partitions():
            region = workload.memory_region(config, partition["uuid"])
            own = [n for n in partition["device_nodes"] if "nvidia-caps" in n]
            partitions[partition["uuid"]] = {
                "own": own,
                "ranges": [[str(r.path), r.offset, r.length] for r in region.ranges],
            }
            for piece in region.ranges:
                piece.path.chmod(0o666)  # the tenant's memory: its jobs write it
        (self.root / "map.json").write_text(json.dumps({"nodes": nodes, "partitions": partitions}))

    def stop(self) -> None:
        for daemon in reversed(self.daemons):
            with contextlib.suppress(ProcessLookupError):
                daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=15)
        self.daemons.clear()
        # What a job leaves behind must be gone with the jobs: Slurm's cgroups are empty.
        leftover = [
            int(pid)
            for procs in self.cgroup_root.rglob("cgroup.procs") if self.cgroup_root.exists()
            for pid in procs.read_text().split()
        ]  # fmt: skip
        _remove_cgroups(self.cgroup_root)
        assert not leftover, f"processes left in Slurm's cgroups: {leftover}"
        assert not self.cgroup_root.exists(), f"{self.cgroup_root} could not be removed"


def _remove_cgroups(root: Path) -> None:
    if not root.exists():
        return
    for directory in [*sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True), root]:
        for pid in (directory / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        for _ in range(50):
            try:
                directory.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def _slurm_conf(root: Path, node: str, ports: tuple[int, int], gres: str) -> str:
    return f"""ClusterName=accelguard
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
GresTypes=gpu
SelectType=select/cons_tres
SchedulerType=sched/builtin
ReturnToService=2
Prolog={root}/prolog
Epilog={root}/epilog
PrologEpilogTimeout=120
PlugStackConfig={root}/plugstack.conf
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory=1000 {gres} State=UNKNOWN
PartitionName=main Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _write_hooks(root: Path, config: Path) -> None:
    for hook in ("prolog", "epilog"):
        script = root / hook
        script.write_text(f"#!/bin/sh\nexec {ACCELGUARD} --config {config} slurm {hook}\n")
        script.chmod(0o755)
    (root / "plugstack.conf").write_text(
        f"required {SPANK} accelguard={ACCELGUARD} config={config}\n"
    )
    (root / "cgroup.conf").write_text(
        "CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\nConstrainDevices=yes\n"
    )


def _start_munge(root: Path) -> subprocess.Popen[bytes]:
    munge = root / "munge"
    munge.mkdir(mode=0o755)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    daemon = subprocess.Popen(
        ["munged", "--foreground", "--force", "-S", str(munge / "munge.socket"),
         "--key-file", str(key), "--pid-file", str(munge / "munged.pid"),
         "--log-file", str(munge / "munged.log"), "--seed-file", str(munge / "seed")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not (munge / "munge.socket").exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"munged did not start: {(munge / 'munged.log').read_text()}")
        time.sleep(0.05)
    return daemon


def _cluster(agent: RunningAgent, root: Path, node: str) -> SlurmCluster:
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    cluster = SlurmCluster(root=root, node_name=node, agent=agent, env=env)
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    gres = subprocess.run(
        [str(ACCELGUARD), "--config", str(agent.config_path), "slurm", "gres-conf",
         "--node", node],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    (root / "gres.conf").write_text(gres)
    node_gres = next(line.split("Gres=")[1] for line in gres.splitlines() if "Gres=" in line)
    ports = (_free_port(), _free_port())
    (root / "slurm.conf").write_text(_slurm_conf(root, node, ports, f"Gres={node_gres}"))
    _write_hooks(root, agent.config_path)
    cluster.daemons.append(_start_munge(root))
    for command in (["slurmctld", "-D", "-i"], ["slurmd", "-D", "-N", node]):
        log = (root / "log" / f"{command[0]}.out").open("wb")
        cluster.daemons.append(
            subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        )
        log.close()
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            if cluster.node_state()[0].startswith("IDLE"):
                break
        if time.monotonic() > deadline:
            logs = "\n".join(p.read_text()[-2000:] for p in (root / "log").iterdir())
            cluster.stop()
            raise AssertionError(f"Slurm did not come up:\n{logs}")
        time.sleep(0.2)
    return cluster


@pytest.fixture
def slurm() -> Iterator[SlurmCluster]:
    missing = _missing()
    if missing is not None:
        pytest.skip(missing)
    if not SPANK.exists():
        subprocess.run(["make", "-s", "-C", str(SPANK.parent.parent)], check=True)
    _ensure_job_user()
    node = f"ag{uuid.uuid4().hex[:6]}"
    root = Path(tempfile.mkdtemp(prefix="accelguard-slurm-"))
    root.chmod(0o755)  # the job user reads the map and the memory below it
    sim: SimNode = init_sim_node(
        root / "node", "h100x1",
        cgroup_parents=[hierarchy_mounts("v1-devices")[0] / f"slurm_{node}"],
        slice_bytes=1 << 20,
    )  # fmt: skip
    running = RunningAgent(node=sim, config=load_config(sim.config_path))
    running.start()
    cluster = None
    try:
        running.cli_json("layout", "apply", "--gpu", "0", "3g.40gb=2")
        wait_all_clean(running)
        cluster = _cluster(running, root, node)
        cluster.write_map()
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        if running.process is not None:
            running.stop(signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
