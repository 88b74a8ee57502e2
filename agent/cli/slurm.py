"""``accelguard slurm gres-conf|prolog|epilog|bind``: accelguard around Slurm jobs (docs/slurm.md).

* ``prolog`` (slurmd's Prolog, root, before the job's cgroup exists): leases the job's GPUs
  (tenant ``job:<id>``) from ``SLURM_JOB_GPUS`` through gres.conf; a dirty or quarantined
  partition is refused. On cgroup v1 it makes the job's devices cgroup and binds the leases to
  it, so the job starts inside accelguard's fence (Slurm adopts the cgroup).
* ``bind`` (the SPANK plugin, at each task's fork): checks the task runs inside the fenced job
  cgroup, binding it if the Prolog could not; on cgroup v2 it does not attach to Slurm's
  cgroups but checks that Slurm's device program is there. Non-zero fails the step.
* ``epilog`` (after the job): releases the leases: revoke, evict strays, scrub, verify, certify.

A Prolog or Epilog that fails drains the node with accelguard's reason first (``scontrol update
... state=drain``), so the reason an operator sees is ours, not "Prolog error".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.cli.slurm_gres import gres_conf_text, gres_records, partition_for, read_gres_conf
from agent.config import Config, load_config
from agent.errors import AccelguardError, ExitCode, ValidationError
from agent.isolation.cgroups import hierarchy_mounts

TENANT_PREFIX = "job:"
_MAX_REASON = 200


def add_parsers(commands: argparse._SubParsersAction[Any]) -> None:
    slurm = commands.add_parser("slurm", help="leases, scrub and drain around Slurm jobs")
    verbs = slurm.add_subparsers(dest="verb", required=True)
    gres = verbs.add_parser("gres-conf", help="print gres.conf for the current layout")
    gres.add_argument("--node", default="", help="Slurm NodeName (default: this host's name)")
    for verb, text in (
        ("prolog", "slurmd Prolog: lease the job's partitions (reads SLURM_* variables)"),
        ("epilog", "slurmd Epilog: release them: evict, scrub, certify"),
    ):
        hook = verbs.add_parser(verb, help=text)
        hook.add_argument(
            "--gres-conf", type=Path,
            help="the gres.conf slurmd reads (default: gres.conf beside SLURM_CONF)",
        )  # fmt: skip
    bind = verbs.add_parser("bind", help="SPANK plugin: fence (or check) a task's job cgroup")
    bind.add_argument("--job", type=int, required=True)
    bind.add_argument("--pid", type=int, required=True, help="the task's pid")


def run(args: argparse.Namespace, config: Config | None = None) -> int:
    if config is None:
        config = load_config(args.config)
    from agent.admin.client import AdminClient  # noqa: PLC0415

    environment = dict(os.environ)
    if args.verb == "gres-conf":
        with AdminClient(config.admin.socket) as client:
            status = client.status()
        node = args.node or os.uname().nodename.split(".")[0]
        sys.stdout.write(gres_conf_text(gres_records(status, node), status.node_id))
        return 0
    if args.verb == "bind":
        with AdminClient(config.admin.socket) as client:
            _bind(client, args.job, args.pid)
        return 0
    job = _job(environment)
    try:
        with AdminClient(config.admin.socket, timeout_s=_hook_timeout(config)) as client:
            if args.verb == "prolog":
                _prolog(client, environment, job, args.gres_conf)
            else:
                _epilog(client, job)
    except AccelguardError as error:
        _drain(environment, f"{args.verb} of job {job}: {error}")
        raise
    return 0


def _hook_timeout(config: Config) -> float:
    # A release waits for the scrub (its worker's deadline) and the eviction's grace.
    return config.scrub.deadline_s + config.leases.evict_grace_s + 60.0


def _job(environment: Mapping[str, str]) -> int:
    text = environment.get("SLURM_JOB_ID", "")
    if not text.isdigit():
        raise ValidationError(f"SLURM_JOB_ID is {text!r}: not run by slurmd as a Prolog/Epilog?")
    return int(text)


def _gpu_indices(environment: Mapping[str, str]) -> list[int]:
    text = environment.get("SLURM_JOB_GPUS", "").strip()
    if not text:
        return []
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise ValidationError(f"SLURM_JOB_GPUS is {text!r}: expected indices like 0,2") from None


def _gres_path(environment: Mapping[str, str], given: Path | None) -> Path:
    if given is not None:
        return given
    return Path(environment.get("SLURM_CONF", "/etc/slurm/slurm.conf")).parent / "gres.conf"


def _job_leases(client: Any, job: int) -> list[Any]:
    return [
        lease for lease in client.list_leases().leases if lease.tenant == f"{TENANT_PREFIX}{job}"
    ]


def _prolog(client: Any, environment: Mapping[str, str], job: int, gres: Path | None) -> None:
    from agent.proto.accelguard.v1 import admin_pb2 as pb  # noqa: PLC0415

    indices = _gpu_indices(environment)
    if not indices:
        return  # a job without GPUs: nothing of ours
    node = environment.get("SLURMD_NODENAME", "")
    records = read_gres_conf(_gres_path(environment, gres), node)
    status = client.status()
    wanted = []
    for index in indices:
        if not 0 <= index < len(records):
            raise ValidationError(
                f"SLURM_JOB_GPUS names GPU {index}, gres.conf has {len(records)} for {node}"
            )
        wanted.append(partition_for(records[index], status))
    held = {lease.partition_uuid: lease for lease in _job_leases(client, job)}
    granted = []
    try:
        for uuid in wanted:
            if uuid in held:
                continue  # a Prolog run again for the same job
            request = pb.GrantLeaseRequest(
                tenant=f"{TENANT_PREFIX}{job}", partition_uuid=uuid, bind_later=True
            )
            granted.append(client.grant_lease(request).lease)
        cgroup = _v1_job_cgroup(node, environment.get("SLURM_JOB_UID", ""), job)
        if cgroup is not None:
            for lease in [*held.values(), *granted]:
                if not lease.cgroup:
                    client.bind_lease(lease.id, str(cgroup))
    except AccelguardError:
        for lease in granted:  # give back what this run took: revoke, evict, scrub
            try:
                client.release_lease(lease.id)
            except AccelguardError as error:
                print(f"accelguard: releasing {lease.id} failed: {error}", file=sys.stderr)
        raise


def _v1_job_cgroup(node: str, uid: str, job: int) -> Path | None:
    """The job's cgroup v1 devices cgroup, made now (Slurm adopts it), or None on cgroup v2.

    Slurm's task/cgroup (cgroup/v1) puts a job under ``<devices>/slurm_<node>/uid_<uid>/
    job_<id>``; v1 refuses to narrow a cgroup that has children, so the fence must be in place
    before Slurm makes the step cgroups below it."""
    mounts = hierarchy_mounts("v1-devices")
    if not mounts:
        return None
    if not uid.isdigit():
        raise ValidationError(f"SLURM_JOB_UID is {uid!r}")
    # slurm_<node> (builds with multiple slurmd per host, Debian's), else plain "slurm" where
    # slurmd made that one.
    slurm = mounts[0] / f"slurm_{node}"
    if not slurm.is_dir() and (mounts[0] / "slurm").is_dir():
        slurm = mounts[0] / "slurm"
    cgroup = slurm / f"uid_{uid}" / f"job_{job}"
    try:
        cgroup.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValidationError(f"cannot make the job's cgroup {cgroup}: {error.strerror}") from error
    return cgroup


def _job_cgroup_of(pid: int, job: int) -> Path | None:
    """The ``job_<id>`` cgroup the task runs in (devices v1, else the v2 hierarchy)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError as error:
        raise ValidationError(f"cannot read the cgroups of task {pid}: {error.strerror}") from error
    wanted = f"job_{job}"
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers not in ("devices", ""):
            continue
        parts = [part for part in path.split("/") if part]
        if wanted not in parts:
            continue
        mounts = hierarchy_mounts("v1-devices" if controllers == "devices" else "v2")
        if mounts:
            return mounts[0].joinpath(*parts[: parts.index(wanted) + 1])
    return None


def _bind(client: Any, job: int, pid: int) -> None:
    from agent.isolation.bpf import BPF_CGROUP_DEVICE, query_programs  # noqa: PLC0415
    from agent.isolation.cgroups import cgroup_hierarchy  # noqa: PLC0415

    leases = [lease for lease in _job_leases(client, job) if lease.state == "active"]
    if not leases:
        return  # a job without GPUs of ours
    cgroup = _job_cgroup_of(pid, job)
    if cgroup is None:
        raise ValidationError(f"task {pid} of job {job} is in no job_{job} cgroup")
    if cgroup_hierarchy(cgroup) == "v2":
        # Slurm's own device programs guard the job (BPF_F_ALLOW_OVERRIDE on job and step): a
        # program of ours there would fail or replace Slurm's. Check that Slurm's is in place.
        descriptor = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            attached = query_programs(descriptor, BPF_CGROUP_DEVICE)
        finally:
            os.close(descriptor)
        if not attached.program_ids:
            raise ValidationError(
                f"job {job}: no device program on {cgroup}: is ConstrainDevices=yes set in "
                "cgroup.conf?"
            )
        return
    for lease in leases:
        if lease.cgroup == str(cgroup):
            continue
        if lease.cgroup:
            raise ValidationError(
                f"job {job}'s lease {lease.id} fences {lease.cgroup}, but the task runs in {cgroup}"
            )
        client.bind_lease(lease.id, str(cgroup))


def _epilog(client: Any, job: int) -> None:
    failed = []
    for lease in _job_leases(client, job):  # live ones only
        partition = client.release_lease(lease.id)
        if not (partition.state == "free" and partition.clean):
            failed.append(f"{partition.uuid} {partition.state}: {partition.reason}")
    if failed:
        raise JobScrubError("; ".join(failed))


class JobScrubError(AccelguardError):
    """A job's partition did not come back clean: the Epilog fails (the node drains)."""

    exit_code = ExitCode.QUARANTINED


def _drain(environment: Mapping[str, str], why: str) -> None:
    """Drain the node with our reason before slurmd records its own ("Prolog error")."""
    node = environment.get("SLURMD_NODENAME", "")
    if not node:
        return
    reason = "accelguard: " + " ".join(why.split())
    if len(reason) > _MAX_REASON:
        reason = reason[: _MAX_REASON - 3] + "..."
    try:
        result = subprocess.run(
            ["scontrol", "update", f"nodename={node}", "state=drain", f"reason={reason}"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as error:
        print(f"accelguard: draining {node} failed: {error}", file=sys.stderr)
        return
    if result.returncode != 0:
        print(f"accelguard: draining {node} failed: {result.stderr.strip()}", file=sys.stderr)
