"""Helpers the lease tests share: tenant cgroups, simulated tenants holding a partition, changes
made behind the agent's back, and short-hands for the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support import ACCELGUARD, REPO, RunningAgent, wait_all_clean


def layout_clean(agent: RunningAgent, *profiles: str, gpu: int = 0) -> list[dict[str, Any]]:
    """Apply a MIG layout on one GPU and wait until every partition is scrubbed clean."""
    agent.cli_json("layout", "apply", "--gpu", str(gpu), *profiles)
    return wait_all_clean(agent)


def grant_capability(
    agent: RunningAgent, cgroup: Path, profile: str, tenant: str, gpu: int = 1
) -> tuple[str, str, str]:
    """(lease id, partition UUID, one of its MIG capability nodes) of a fresh lease of a lone
    ``profile`` instance on ``gpu``. Simulated nodes on one kernel share device numbers: tests
    that hold a capability node while the suite runs beside them each take a profile of their
    own (GPU 1, one the other lease tests rarely use)."""
    layout_clean(agent, f"{profile}=1", gpu=gpu)
    grant = agent.cli_json(
        "lease", "grant", "--tenant", tenant, "--profile", profile, "--cgroup", str(cgroup)
    )
    nodes = [n for n in grant["partition"]["device_nodes"] if "/nvidia-caps/" in n]
    assert nodes, grant
    return grant["lease"]["id"], grant["partition"]["uuid"], nodes[-1]


def tenant_cgroup(parents: dict[str, Path], hierarchy: str, name: str) -> Path:
    path = parents[hierarchy] / name
    path.mkdir(exist_ok=True)
    return path


def any_tenant_cgroup(parents: dict[str, Path], name: str) -> Path:
    """A tenant cgroup on whichever device hierarchy the machine has (v2 preferred)."""
    return tenant_cgroup(parents, "v2" if "v2" in parents else "v1", name)


def hold(agent: RunningAgent, partition: str, *extra: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [*ACCELGUARD, "--config", str(agent.config_path), "sim", "hold", "--partition", partition,
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("holding"), process.stderr.read() if process.stderr else line
    return process


@contextmanager
def holding(paths: list[Path], cgroup: Path | None = None) -> Iterator[subprocess.Popen[str]]:
    """A process holding ``paths`` (in ``cgroup`` if given) until the block ends.

    O_PATH, because a simulated node has no driver behind its nodes (open() fails with ENXIO);
    the descriptor still names the device, which is what eviction looks at.
    """
    descriptors = [os.open(path, os.O_PATH) for path in paths]
    try:
        process = subprocess.Popen(["sleep", "infinity"], pass_fds=descriptors, text=True)
    finally:
        for descriptor in descriptors:
            os.close(descriptor)
    try:
        # Popen returns once the exec succeeded: the inherited descriptors are in place.
        for descriptor, path in zip(descriptors, paths, strict=True):
            held = Path(f"/proc/{process.pid}/fd/{descriptor}").stat().st_rdev
            assert held == path.stat().st_rdev
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(process.pid))
        yield process
    finally:
        process.kill()
        process.wait(timeout=30)


def reap(process: subprocess.Popen[str]) -> int:
    """Wait for an evicted holder and close its pipes; returns its exit status."""
    code = process.wait(timeout=30)
    for pipe in (process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()
    return code


# What `nvidia-smi mig -dci -dgi`, `nvidia-smi -mig 0` or mig-parted do: NVML calls from another
# process, which the agent only learns of at its next inventory refresh.
BEHIND_OUR_BACK = """
import sys
from pathlib import Path
from agent.config import load_config
from agent.hw.nvml import NvmlBackend
config = load_config(Path(sys.argv[1]))
with NvmlBackend(config.nvml.library, config.nvml.sim_dir) as nvml:
    if sys.argv[2] == "destroy":
        nvml.destroy_instance(int(sys.argv[3]), int(sys.argv[4]))
    else:
        nvml.set_mig_mode(int(sys.argv[3]), sys.argv[4] == "on")
"""


def behind_our_back(agent: RunningAgent, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-c", BEHIND_OUR_BACK, str(agent.config_path), *args],
        check=True, cwd=REPO, timeout=60, capture_output=True,
    )  # fmt: skip


def grant(agent: RunningAgent, tenant: str, cgroup: Path, **selector: str) -> dict[str, Any]:
    [(key, value)] = selector.items()
    return dict(
        agent.cli_json(
            "lease", "grant", "--tenant", tenant, f"--{key}", value, "--cgroup", str(cgroup)
        )
    )


def lease_state(agent: RunningAgent, lease_id: str) -> dict[str, Any]:
    leases = agent.cli_json("lease", "list", "--all")["leases"]
    return dict(next(lease for lease in leases if lease["id"] == lease_id))


def partition(agent: RunningAgent, uuid: str) -> dict[str, Any] | None:
    for item in agent.cli_json("partition", "list")["partitions"]:
        if item["uuid"] == uuid:
            return dict(item)
    return None
