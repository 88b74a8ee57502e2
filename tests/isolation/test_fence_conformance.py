"""What every DeviceFence must do, checked by the real kernel on cgroup v1 and cgroup v2.

Each test runs once per hierarchy (the ``tenant_cgroup`` fixture is parametrised). Enforcement is
observed, not assumed: a child process placed in the cgroup opens each node, and the kernel
answers ENXIO (allowed, no driver behind the major) or EPERM (denied by the fence).
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import IsolationError, ValidationError
from agent.isolation import fence_for
from agent.isolation.cgroup_v1 import CgroupV1Fence
from agent.isolation.cgroup_v2 import CgroupV2Fence
from agent.isolation.rules import DeviceRule, parse_rule, rules_for_nodes

BASELINE_NODES = {
    "null": Path("/dev/null"),
    "zero": Path("/dev/zero"),
    "urandom": Path("/dev/urandom"),
}


def gpu_nodes(sim_dev) -> dict[str, Path]:
    return {path.name: path for path in sim_dev.gpu_nodes}


def test_fence_for_picks_the_backend_of_the_hierarchy(tenant_cgroup: Path) -> None:
    fence = fence_for(tenant_cgroup)
    # Told apart by the kernel's own files, independently of our mountinfo parsing.
    if (tenant_cgroup / "cgroup.controllers").exists():  # only cgroup2 has this file
        assert isinstance(fence, CgroupV2Fence)
    else:
        assert (tenant_cgroup / "devices.list").exists()
        assert isinstance(fence, CgroupV1Fence)


def test_fence_for_refuses_a_directory_that_is_not_a_cgroup(tmp_path: Path) -> None:
    with pytest.raises(IsolationError, match="neither a cgroup v2"):
        fence_for(tmp_path)


def test_unfenced_cgroup_reports_no_fence(tenant_cgroup: Path, sim_dev, probe) -> None:
    assert fence_for(tenant_cgroup).current(tenant_cgroup) is None
    result = probe.open(tenant_cgroup, gpu_nodes(sim_dev))
    assert set(result.values()) == {errno.ENXIO}


def test_apply_allows_exactly_the_partition_and_baseline(
    tenant_cgroup: Path, sim_dev, probe
) -> None:
    fence = fence_for(tenant_cgroup)
    fence.apply(tenant_cgroup, rules_for_nodes(sim_dev.partition0))

    result = probe.open(tenant_cgroup, {**gpu_nodes(sim_dev), **BASELINE_NODES})
    allowed = {path.name for path in sim_dev.partition0}
    for name in gpu_nodes(sim_dev):
        expected = errno.ENXIO if name in allowed else errno.EPERM
        assert result[name] == expected, name
    assert result["null"] == result["zero"] == result["urandom"] == 0


def test_revoke_leaves_only_the_baseline(tenant_cgroup: Path, sim_dev, probe) -> None:
    fence = fence_for(tenant_cgroup)
    fence.apply(tenant_cgroup, rules_for_nodes(sim_dev.partition0))
    fence.revoke(tenant_cgroup)

    result = probe.open(tenant_cgroup, {**gpu_nodes(sim_dev), **BASELINE_NODES})
    assert {result[name] for name in gpu_nodes(sim_dev)} == {errno.EPERM}
    assert result["null"] == 0
    state = fence.current(tenant_cgroup)
    assert state is not None
    assert state.grants_exactly([])


def test_current_reads_back_what_was_applied(tenant_cgroup: Path, sim_dev) -> None:
    rules = rules_for_nodes(sim_dev.partition0)
    fence_for(tenant_cgroup).apply(tenant_cgroup, rules)

    state = fence_for(tenant_cgroup).current(tenant_cgroup)
    assert state is not None
    assert state.grants_exactly(rules)
    assert not state.grants_exactly(rules_for_nodes([sim_dev.nvidia1]))


def test_a_restarted_agent_replaces_its_fence(tenant_cgroup: Path, sim_dev, probe) -> None:
    # Two fence objects share nothing in memory: the second finds the first's fence in the kernel.
    fence_for(tenant_cgroup).apply(tenant_cgroup, rules_for_nodes([sim_dev.nvidia0]))
    after_restart = fence_for(tenant_cgroup)
    assert after_restart.current(tenant_cgroup) is not None
    after_restart.apply(tenant_cgroup, rules_for_nodes([sim_dev.nvidia1]))

    result = probe.open(tenant_cgroup, {"nvidia0": sim_dev.nvidia0, "nvidia1": sim_dev.nvidia1})
    assert result == {"nvidia0": errno.EPERM, "nvidia1": errno.ENXIO}
    state = after_restart.current(tenant_cgroup)
    assert state is not None
    assert state.grants_exactly(rules_for_nodes([sim_dev.nvidia1]))


@pytest.mark.parametrize(
    "rule",
    ["a *:* rwm", "c 195:* rw", "c *:0 rw", "b *:* rwm"],
)
def test_wildcard_rules_are_rejected_and_nothing_changes(
    tenant_cgroup: Path, sim_dev, rule: str
) -> None:
    fence = fence_for(tenant_cgroup)
    fence.apply(tenant_cgroup, rules_for_nodes([sim_dev.nvidia0]))
    with pytest.raises(ValidationError, match="wildcard"):
        fence.apply(tenant_cgroup, [parse_rule(rule)])
    state = fence.current(tenant_cgroup)
    assert state is not None
    assert state.grants_exactly(rules_for_nodes([sim_dev.nvidia0]))


def test_non_rules_are_rejected(tenant_cgroup: Path) -> None:
    fence = fence_for(tenant_cgroup)
    with pytest.raises(ValidationError):
        fence.apply(tenant_cgroup, ["c 195:0 rw"])  # type: ignore[list-item]
    with pytest.raises(ValidationError):
        fence.apply(tenant_cgroup, "c 195:0 rw")  # type: ignore[arg-type]
    too_many = [DeviceRule("c", 200, minor, frozenset("r")) for minor in range(1025)]
    with pytest.raises(ValidationError, match="more than"):
        fence.apply(tenant_cgroup, too_many)
    assert fence.current(tenant_cgroup) is None


def test_access_letters_are_enforced(tenant_cgroup: Path, sim_dev, probe, tmp_path: Path) -> None:
    read_only = DeviceRule("c", sim_dev.gpu_major, 0, frozenset("r"))
    with_mknod = DeviceRule("c", sim_dev.gpu_major, 1, frozenset("rwm"))
    fence_for(tenant_cgroup).apply(tenant_cgroup, [read_only, with_mknod])

    nodes = {"nvidia0": sim_dev.nvidia0}
    assert probe.open(tenant_cgroup, nodes, os.O_RDONLY) == {"nvidia0": errno.ENXIO}
    assert probe.open(tenant_cgroup, nodes, os.O_RDWR) == {"nvidia0": errno.EPERM}
    assert probe.open(tenant_cgroup, nodes, os.O_WRONLY) == {"nvidia0": errno.EPERM}
    assert probe.mknod(tenant_cgroup, tmp_path / "made1", sim_dev.gpu_major, 1) == 0
    assert probe.mknod(tenant_cgroup, tmp_path / "made0", sim_dev.gpu_major, 0) == errno.EPERM


def test_remove_takes_the_fence_away(tenant_cgroup: Path, sim_dev, probe) -> None:
    fence = fence_for(tenant_cgroup)
    fence.apply(tenant_cgroup, rules_for_nodes([sim_dev.nvidia0]))
    fence.remove(tenant_cgroup)

    assert fence.current(tenant_cgroup) is None
    result = probe.open(tenant_cgroup, gpu_nodes(sim_dev))
    assert set(result.values()) == {errno.ENXIO}


def test_missing_cgroup_is_an_isolation_error(tenant_cgroup: Path, sim_dev) -> None:
    fence = fence_for(tenant_cgroup)
    gone = tenant_cgroup / "never-created"
    with pytest.raises(IsolationError, match="never-created"):
        fence.apply(gone, rules_for_nodes([sim_dev.nvidia0]))
    with pytest.raises(IsolationError):
        fence.current(gone)


@pytest.fixture
def v2_mounted_elsewhere(v2_cgroup: Path, tmp_path: Path) -> Iterator[Path]:
    """The same cgroup reached through a second cgroup2 mount at a path nobody hard-codes."""
    mount_point = tmp_path / "elsewhere"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "cgroup2", "none", str(mount_point)], capture_output=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a second cgroup2 view here: {done.stderr.decode().strip()}")
    try:
        yield mount_point / v2_cgroup.name
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def test_hierarchies_are_found_wherever_they_are_mounted(
    v2_mounted_elsewhere: Path, sim_dev, probe
) -> None:
    fence = fence_for(v2_mounted_elsewhere)
    assert isinstance(fence, CgroupV2Fence)
    fence.apply(v2_mounted_elsewhere, rules_for_nodes([sim_dev.nvidia0]))
    nodes = {"nvidia0": sim_dev.nvidia0, "nvidia1": sim_dev.nvidia1}
    assert probe.open(v2_mounted_elsewhere, nodes) == {
        "nvidia0": errno.ENXIO,
        "nvidia1": errno.EPERM,
    }
