"""cgroup v2 specifics: one program of ours, replaced atomically; programs of others untouched."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.errors import IsolationError
from agent.isolation import bpf
from agent.isolation.cgroup_v2 import (
    PREAMBLE,
    PROGRAM_LICENSE,
    PROGRAM_NAME,
    CgroupV2Fence,
    device_program,
)
from agent.isolation.protocol import fenced_rules
from agent.isolation.rules import DeviceRule, rules_for_nodes


class CgroupHandle:
    """An open cgroup directory, for the test's own bpf(2) calls."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)

    def programs(self) -> bpf.AttachedPrograms:
        return bpf.query_programs(self.fd, bpf.BPF_CGROUP_DEVICE)

    def names(self) -> list[str]:
        names = []
        for program_id in self.programs().program_ids:
            with bpf.owned_fd(bpf.program_fd_by_id(program_id)) as fd:
                names.append(bpf.program_info(fd).name)
        return names


@pytest.fixture
def handle(v2_cgroup: Path) -> Iterator[CgroupHandle]:
    opened = CgroupHandle(v2_cgroup)
    try:
        yield opened
    finally:
        os.close(opened.fd)


def deny_one_device(major: int, minor: int) -> tuple[bpf.Instruction, ...]:
    """A program someone else might attach: deny one char device, allow everything else."""
    return (
        *PREAMBLE,
        bpf.jump_imm(bpf.BPF_JNE, bpf.R2, bpf.BPF_DEVCG_DEV_CHAR, 4),
        bpf.jump_imm(bpf.BPF_JNE, bpf.R4, major, 3),
        bpf.jump_imm(bpf.BPF_JNE, bpf.R5, minor, 2),
        bpf.alu32_imm(bpf.BPF_MOV, bpf.R0, 0),
        bpf.exit_program(),
        bpf.alu32_imm(bpf.BPF_MOV, bpf.R0, 1),
        bpf.exit_program(),
    )


def attach_foreign(handle: CgroupHandle, program: tuple[bpf.Instruction, ...], flags: int) -> int:
    with bpf.owned_fd(
        bpf.load_program(bpf.BPF_PROG_TYPE_CGROUP_DEVICE, program, "foreign_dev", PROGRAM_LICENSE)
    ) as fd:
        bpf.attach_program(handle.fd, fd, bpf.BPF_CGROUP_DEVICE, flags)
        return bpf.program_info(fd).program_id


def attach_ours_by_hand(handle: CgroupHandle, rules_program: tuple[bpf.Instruction, ...]) -> int:
    with bpf.owned_fd(
        bpf.load_program(
            bpf.BPF_PROG_TYPE_CGROUP_DEVICE, rules_program, PROGRAM_NAME, PROGRAM_LICENSE
        )
    ) as fd:
        bpf.attach_program(handle.fd, fd, bpf.BPF_CGROUP_DEVICE, bpf.BPF_F_ALLOW_MULTI)
        return bpf.program_info(fd).program_id


def test_replacing_keeps_exactly_one_program(v2_cgroup: Path, handle, sim_dev) -> None:
    fence = CgroupV2Fence()
    fence.apply(v2_cgroup, rules_for_nodes([sim_dev.nvidia0]))
    first = handle.programs()
    fence.apply(v2_cgroup, rules_for_nodes([sim_dev.nvidia1]))
    second = handle.programs()

    assert len(first.program_ids) == len(second.program_ids) == 1
    assert first.program_ids != second.program_ids
    assert second.attach_flags == bpf.BPF_F_ALLOW_MULTI
    state = fence.current(v2_cgroup)
    assert state is not None
    assert state.program_ids == second.program_ids


def test_foreign_program_stays_attached_and_keeps_restricting(
    v2_cgroup: Path, handle, sim_dev, probe
) -> None:
    foreign = attach_foreign(handle, deny_one_device(sim_dev.gpu_major, 0), bpf.BPF_F_ALLOW_MULTI)
    fence = CgroupV2Fence()
    fence.apply(v2_cgroup, rules_for_nodes(sim_dev.partition0))
    fence.apply(v2_cgroup, rules_for_nodes(sim_dev.partition0))  # a replace, too

    assert foreign in handle.programs().program_ids
    assert sorted(handle.names()) == ["accelguard_dev", "foreign_dev"]
    nodes = {"nvidia0": sim_dev.nvidia0, "ctl": sim_dev.nvidiactl, "nvidia1": sim_dev.nvidia1}
    # Ours allows nvidia0; the foreign program denies it, and the kernel wants both to agree.
    assert probe.open(v2_cgroup, nodes) == {
        "nvidia0": errno.EPERM,
        "ctl": errno.ENXIO,
        "nvidia1": errno.EPERM,
    }

    fence.revoke(v2_cgroup)
    fence.remove(v2_cgroup)
    assert handle.programs().program_ids == (foreign,)
    assert probe.open(v2_cgroup, nodes) == {
        "nvidia0": errno.EPERM,
        "ctl": errno.ENXIO,
        "nvidia1": errno.ENXIO,
    }


def test_exclusive_foreign_program_is_reported_not_removed(
    v2_cgroup: Path, handle, sim_dev
) -> None:
    foreign = attach_foreign(handle, deny_one_device(sim_dev.gpu_major, 0), 0)
    fence = CgroupV2Fence()
    with pytest.raises(IsolationError, match="BPF_F_ALLOW_MULTI"):
        fence.apply(v2_cgroup, rules_for_nodes([sim_dev.nvidia0]))
    assert handle.programs().program_ids == (foreign,)
    assert fence.current(v2_cgroup) is None


def test_leftover_programs_of_ours_collapse_to_one(v2_cgroup: Path, handle, sim_dev) -> None:
    # As if a crash had left two behind; each only restricts, so the cgroup is still fenced.
    program = device_program(fenced_rules(rules_for_nodes([sim_dev.nvidia0])))
    stale = {attach_ours_by_hand(handle, program), attach_ours_by_hand(handle, program)}
    fence = CgroupV2Fence()
    state = fence.current(v2_cgroup)
    assert state is not None
    assert state.allowed is None  # two of ours: the rules in force are not one program's
    assert set(state.program_ids) == stale

    fence.apply(v2_cgroup, rules_for_nodes([sim_dev.nvidia1]))
    ids = handle.programs().program_ids
    assert len(ids) == 1
    assert not set(ids) & stale
    state = fence.current(v2_cgroup)
    assert state is not None
    assert state.grants_exactly(rules_for_nodes([sim_dev.nvidia1]))


def test_remove_without_a_fence_is_a_no_op(v2_cgroup: Path, handle) -> None:
    CgroupV2Fence().remove(v2_cgroup)
    assert handle.programs().program_ids == ()


def test_a_plain_directory_cannot_be_fenced(tmp_path: Path, sim_dev) -> None:
    with pytest.raises(IsolationError, match="not a cgroup v2 directory"):
        CgroupV2Fence().apply(tmp_path, rules_for_nodes([sim_dev.nvidia0]))


def test_fences_are_inherited_by_child_cgroups(v2_cgroup: Path, sim_dev, probe) -> None:
    CgroupV2Fence().apply(v2_cgroup, rules_for_nodes([sim_dev.nvidia0]))
    child = v2_cgroup / "workload"
    child.mkdir()
    nodes = {"nvidia0": sim_dev.nvidia0, "nvidia1": sim_dev.nvidia1}
    assert probe.open(child, nodes) == {"nvidia0": errno.ENXIO, "nvidia1": errno.EPERM}


def test_exclusive_program_on_an_ancestor_is_reported(v2_cgroup: Path, handle, sim_dev) -> None:
    # The kernel's own check (hierarchy_allows_attach): nothing below a program attached with
    # no flags may attach another.
    attach_foreign(handle, deny_one_device(sim_dev.gpu_major, 0), 0)
    tenant = v2_cgroup / "tenant"
    tenant.mkdir()
    with pytest.raises(bpf.BpfSyscallError, match=r"EPERM.*ancestors") as caught:
        CgroupV2Fence().apply(tenant, rules_for_nodes([sim_dev.nvidia0]))
    assert caught.value.errno == errno.EPERM
    assert CgroupV2Fence().current(tenant) is None


def open_descriptors() -> set[str]:
    return {entry.name for entry in Path("/proc/self/fd").iterdir()}


def test_no_file_descriptor_is_left_open(v2_cgroup: Path, handle, sim_dev) -> None:
    attach_foreign(handle, deny_one_device(sim_dev.gpu_major, 1), bpf.BPF_F_ALLOW_MULTI)
    fence = CgroupV2Fence()
    # First uses load libc and keep each rule set's program (test_a_rule_set_is_loaded_once).
    fence.apply(v2_cgroup, rules_for_nodes([sim_dev.nvidia0]))
    fence.apply(v2_cgroup, rules_for_nodes(sim_dev.partition0))
    fence.revoke(v2_cgroup)
    before = open_descriptors()
    fence.apply(v2_cgroup, rules_for_nodes(sim_dev.partition0))
    fence.current(v2_cgroup)
    fence.revoke(v2_cgroup)
    with pytest.raises(IsolationError):
        CgroupV2Fence().apply(v2_cgroup / "missing", rules_for_nodes([sim_dev.nvidia0]))
    fence.remove(v2_cgroup)
    assert open_descriptors() == before


def test_a_rule_set_is_loaded_once_and_shared(v2_cgroup: Path, sim_dev, probe) -> None:
    """A loaded program is kept per rule set: a second cgroup, or the same one again, gets the
    very program (no verifier, no JIT), and it enforces in each cgroup it is attached to."""
    fence = CgroupV2Fence()
    first, second = v2_cgroup / "a", v2_cgroup / "b"
    first.mkdir()
    second.mkdir()
    handles = [CgroupHandle(first), CgroupHandle(second)]
    try:
        only_gpu0 = rules_for_nodes([sim_dev.nvidia0])
        fence.apply(first, only_gpu0)
        fence.apply(second, only_gpu0)
        ids = [h.programs().program_ids for h in handles]
        assert len(ids[0]) == 1
        assert ids[0] == ids[1]
        fence.apply(first, rules_for_nodes([sim_dev.nvidia1]))
        assert handles[0].programs().program_ids != ids[0]
        fence.apply(first, only_gpu0)
        assert handles[0].programs().program_ids == ids[0]
        # Already attached, beside a leftover of ours with the same rules: the leftover goes.
        attach_ours_by_hand(handles[0], device_program(fenced_rules(only_gpu0)))
        assert len(handles[0].programs().program_ids) == 2
        fence.apply(first, only_gpu0)
        assert handles[0].programs().program_ids == ids[0]
        nodes = {"nvidia0": sim_dev.nvidia0, "nvidia1": sim_dev.nvidia1}
        for cgroup in (first, second):
            assert probe.open(cgroup, nodes) == {"nvidia0": errno.ENXIO, "nvidia1": errno.EPERM}
    finally:
        for opened in handles:
            os.close(opened.fd)
        fence.remove(first)
        fence.remove(second)


def test_kept_programs_are_bounded(sim_dev) -> None:
    kept = bpf.KeptPrograms(size=2)
    before = open_descriptors()
    rule_sets = [fenced_rules(rules_for_nodes([node])) for node in sim_dev.partition0[:3]]

    def loader(rules: tuple[DeviceRule, ...]) -> Callable[[], int]:
        return lambda: bpf.load_program(
            bpf.BPF_PROG_TYPE_CGROUP_DEVICE, device_program(rules), PROGRAM_NAME, PROGRAM_LICENSE
        )

    ids = []
    for rules in rule_sets:
        program_id, descriptor = kept.get(rules, loader(rules))
        bpf.close_fd(descriptor)  # the caller's own descriptor
        ids.append(program_id)
    assert len(set(ids)) == 3
    assert len(open_descriptors() - before) == 2  # the oldest was closed
    again, descriptor = kept.get(rule_sets[0], loader(rule_sets[0]))
    bpf.close_fd(descriptor)
    assert again not in ids  # loaded anew
