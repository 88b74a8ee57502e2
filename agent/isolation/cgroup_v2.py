"""cgroup v2 device fence: a generated BPF_PROG_TYPE_CGROUP_DEVICE program per tenant cgroup.

The program has the shape runc, crun and systemd generate: a preamble that loads the device type
(low 16 bits of ``access_type``), the requested access (high 16 bits), major and minor from
``struct bpf_cgroup_dev_ctx`` into r2..r5; one block per allow rule that compares them (a
wildcard skips its comparison) and returns 1; and a final ``return 0``.

Attachment uses BPF_F_ALLOW_MULTI, so programs attached by others (systemd, a container runtime)
stay attached and keep restricting: the kernel allows an access only if every program in the
cgroup's effective array returns 1 (kernel/bpf/cgroup.c, __cgroup_bpf_check_dev_permission).
Our program is recognised by its name; a new fence replaces the old one in one BPF_PROG_ATTACH
with BPF_F_REPLACE, so the cgroup is never without a fence.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.errors import BpfSyscallError, IsolationError, ValidationError
from agent.isolation import bpf
from agent.isolation.protocol import FenceState, Mechanism, fenced_rules
from agent.isolation.rules import FULL_ACCESS, DeviceKind, DeviceRule, normalise

PROGRAM_NAME = "accelguard_dev"
# Any licence string loads: a cgroup device program calls no GPL-only helper (the kernel only
# checks gpl_compatible when a helper demands it). This is the project's licence.
PROGRAM_LICENSE = "Apache-2.0"

_DEVICE_TYPE = {"c": bpf.BPF_DEVCG_DEV_CHAR, "b": bpf.BPF_DEVCG_DEV_BLOCK}
_ACCESS_BITS = {
    "r": bpf.BPF_DEVCG_ACC_READ,
    "w": bpf.BPF_DEVCG_ACC_WRITE,
    "m": bpf.BPF_DEVCG_ACC_MKNOD,
}

# r1 holds the context on entry; r2..r5 receive type, access, major, minor.
PREAMBLE: tuple[bpf.Instruction, ...] = (
    bpf.load_word(bpf.R2, bpf.R1, 0),
    bpf.alu32_imm(bpf.BPF_AND, bpf.R2, 0xFFFF),
    bpf.load_word(bpf.R3, bpf.R1, 0),
    bpf.alu32_imm(bpf.BPF_RSH, bpf.R3, 16),
    bpf.load_word(bpf.R4, bpf.R1, 4),
    bpf.load_word(bpf.R5, bpf.R1, 8),
)
_ALLOW = (bpf.alu32_imm(bpf.BPF_MOV, bpf.R0, 1), bpf.exit_program())
_DENY = (bpf.alu32_imm(bpf.BPF_MOV, bpf.R0, 0), bpf.exit_program())


def access_mask(access: Iterable[str]) -> int:
    mask = 0
    for letter in access:
        mask |= _ACCESS_BITS[letter]
    return mask


def device_program(rules: Sequence[DeviceRule]) -> tuple[bpf.Instruction, ...]:
    """The allow-list program for exactly ``rules`` (normalised here; nothing added)."""
    return _compiled(tuple(rules))


@functools.lru_cache(maxsize=256)
def _compiled(rules: tuple[DeviceRule, ...]) -> tuple[bpf.Instruction, ...]:
    """device_program's work, kept per rule set: every read-back of a fence compiles its rules
    again to compare (``rules_from_program``), and building one costs about 0.1 ms."""
    program = list(PREAMBLE)
    for rule in normalise(rules):
        block = _rule_block(rule)
        program.extend(block)
        if block == list(_ALLOW):
            # "a *:* rwm" allows everything: the verifier rejects any instruction after an
            # unconditional exit as unreachable (check_cfg), so the program ends here.
            return tuple(program)
    program.extend(_DENY)
    return tuple(program)


@dataclass(frozen=True)
class _Check:
    register: int
    value: int


def _rule_block(rule: DeviceRule) -> list[bpf.Instruction]:
    # Each check is a "jump past this block if it does not match"; the block ends in return 1.
    checks: list[_Check | Literal["access"]] = []
    if rule.kind != "a":
        checks.append(_Check(bpf.R2, _DEVICE_TYPE[rule.kind]))
    if rule.access != FULL_ACCESS:
        checks.append("access")
    if rule.major is not None:
        checks.append(_Check(bpf.R4, rule.major))
    if rule.minor is not None:
        checks.append(_Check(bpf.R5, rule.minor))

    length = sum(1 if isinstance(check, _Check) else 3 for check in checks) + len(_ALLOW)
    block: list[bpf.Instruction] = []
    for check in checks:
        if not isinstance(check, _Check):
            # Allowed only if the requested bits are a subset of the rule's: (r3 & mask) == r3.
            # r1 (the context pointer) is free once the preamble has run.
            block.append(bpf.mov32_reg(bpf.R1, bpf.R3))
            block.append(bpf.alu32_imm(bpf.BPF_AND, bpf.R1, access_mask(rule.access)))
            block.append(bpf.jump_reg(bpf.BPF_JNE, bpf.R1, bpf.R3, length - len(block) - 1))
        else:
            block.append(
                bpf.jump_imm(bpf.BPF_JNE, check.register, check.value, length - len(block) - 1)
            )
    block.extend(_ALLOW)
    return block


def rules_from_program(raw: bytes) -> tuple[DeviceRule, ...] | None:
    """Recover the rules of a program ``device_program`` generated; None for any other program.

    The decoded rules are compiled again and must reproduce ``raw`` byte for byte, so a program
    that merely resembles ours is never misread.
    """
    try:
        instructions = bpf.decode_program(raw)
    except IsolationError:
        return None
    if instructions[: len(PREAMBLE)] != PREAMBLE:
        return None
    if instructions[len(PREAMBLE) :] == _ALLOW:
        return (DeviceRule("a", None, None, FULL_ACCESS),)
    position = len(PREAMBLE)
    rules: list[DeviceRule] = []
    end = len(instructions) - len(_DENY)
    while position < end:
        decoded = _decode_block(instructions, position, end)
        if decoded is None:
            return None
        rule, position = decoded
        rules.append(rule)
    if bpf.encode_program(device_program(rules)) != raw:
        return None
    return tuple(rules)


def _decode_block(
    instructions: Sequence[bpf.Instruction], position: int, end: int
) -> tuple[DeviceRule, int] | None:
    kind: DeviceKind = "a"
    access = FULL_ACCESS
    major: int | None = None
    minor: int | None = None
    jne_imm = bpf.BPF_JMP | bpf.BPF_JNE | bpf.BPF_K
    while position < end:
        instruction = instructions[position]
        if instruction == bpf.mov32_reg(bpf.R1, bpf.R3) and position + 2 < end:
            mask = instructions[position + 1].imm
            access = frozenset(letter for letter, bit in _ACCESS_BITS.items() if mask & bit)
            position += 3
            continue
        if instruction.code == jne_imm and instruction.dst == bpf.R2:
            kind = "c" if instruction.imm == bpf.BPF_DEVCG_DEV_CHAR else "b"
        elif instruction.code == jne_imm and instruction.dst == bpf.R4:
            major = instruction.imm
        elif instruction.code == jne_imm and instruction.dst == bpf.R5:
            minor = instruction.imm
        elif tuple(instructions[position : position + len(_ALLOW)]) == _ALLOW:
            try:
                rule = DeviceRule(kind, major, minor, access)
            except ValidationError:
                return None
            return rule, position + len(_ALLOW)
        else:
            return None
        position += 1
    return None


@dataclass(frozen=True)
class _OurProgram:
    program_id: int
    fd: int


# Device programs by rule set (bpf.KeptPrograms): a node's fences cycle through few rule sets
# (each partition's nodes, the baseline), and one program may be attached to many cgroups.
_kept = bpf.KeptPrograms(64)


def _program(rules: tuple[DeviceRule, ...]) -> _OurProgram:
    """The program for ``rules`` (kept, loaded on first use), with a descriptor of its own."""
    program_id, descriptor = _kept.get(
        rules,
        lambda: bpf.load_program(
            bpf.BPF_PROG_TYPE_CGROUP_DEVICE, device_program(rules), PROGRAM_NAME, PROGRAM_LICENSE
        ),
    )
    return _OurProgram(program_id, descriptor)


class CgroupV2Fence:
    """DeviceFence for a cgroup on a cgroup2 mount."""

    mechanism: Mechanism = "cgroup-v2-bpf"

    def apply(self, cgroup: Path, rules: Sequence[DeviceRule]) -> None:
        allowed = fenced_rules(rules)
        self._install(Path(cgroup), allowed)

    def revoke(self, cgroup: Path) -> None:
        self._install(Path(cgroup), fenced_rules(()))

    def current(self, cgroup: Path) -> FenceState | None:
        with contextlib.ExitStack() as closing:
            cgroup_fd = closing.enter_context(bpf.owned_fd(_open_cgroup(Path(cgroup))))
            ours = _our_programs(cgroup_fd, closing)
            if not ours:
                return None
            ids = tuple(program.program_id for program in ours)
            if len(ours) > 1:
                return FenceState(self.mechanism, None, ids)
            info = bpf.program_info(ours[0].fd, with_instructions=True)
            allowed = None if info.instructions is None else rules_from_program(info.instructions)
            return FenceState(self.mechanism, allowed, ids)

    def remove(self, cgroup: Path) -> None:
        with contextlib.ExitStack() as closing:
            cgroup_fd = closing.enter_context(bpf.owned_fd(_open_cgroup(Path(cgroup))))
            for program in _our_programs(cgroup_fd, closing):
                _detach_ignoring_gone(cgroup_fd, program)

    def _install(self, cgroup: Path, allowed: tuple[DeviceRule, ...]) -> None:
        with contextlib.ExitStack() as closing:
            cgroup_fd = closing.enter_context(bpf.owned_fd(_open_cgroup(cgroup)))
            # Loaded before touching the cgroup: a verifier rejection then changes nothing.
            new = _program(allowed)
            closing.callback(bpf.close_fd, new.fd)
            attached = bpf.query_programs(cgroup_fd, bpf.BPF_CGROUP_DEVICE)
            if attached.program_ids and not attached.attach_flags & bpf.BPF_F_ALLOW_MULTI:
                raise IsolationError(
                    f"cannot fence {cgroup}: programs {list(attached.program_ids)} are attached "
                    "without BPF_F_ALLOW_MULTI, so the kernel allows no other device program; "
                    "accelguard never detaches programs it did not attach: ask whoever attached "
                    "them to use BPF_F_ALLOW_MULTI"
                )
            ours = _our_programs(cgroup_fd, closing, attached.program_ids)
            already = [program for program in ours if program.program_id == new.program_id]
            if already:
                # The cgroup already runs this very program (the kernel refuses it twice).
                extras = [program for program in ours if program is not already[0]]
            elif ours:
                # One syscall swaps the old program for the new in the cgroup's array: no window.
                bpf.attach_program(
                    cgroup_fd, new.fd, bpf.BPF_CGROUP_DEVICE, bpf.BPF_F_ALLOW_MULTI, ours[0].fd
                )
                extras = ours[1:]
            else:
                bpf.attach_program(cgroup_fd, new.fd, bpf.BPF_CGROUP_DEVICE, bpf.BPF_F_ALLOW_MULTI)
                extras = []
            # Left over from a crash or a concurrent writer: they only restrict more, and the
            # new program is already enforcing, so detaching them now opens nothing beyond it.
            for extra in extras:
                _detach_ignoring_gone(cgroup_fd, extra)
            self._verify(cgroup, cgroup_fd, new.program_id, closing)

    def _verify(
        self, cgroup: Path, cgroup_fd: int, new_id: int, closing: contextlib.ExitStack
    ) -> None:
        ours = _our_programs(cgroup_fd, closing)
        ids = [program.program_id for program in ours]
        if ids != [new_id]:
            raise IsolationError(
                f"fence on {cgroup} did not take: expected only accelguard program {new_id} "
                f"attached, found {ids}; treat the cgroup as unfenced"
            )


def _open_cgroup(cgroup: Path) -> int:
    try:
        return os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise IsolationError(f"cannot open cgroup {cgroup}: {error.strerror}") from error


def _our_programs(
    cgroup_fd: int, closing: contextlib.ExitStack, program_ids: Sequence[int] | None = None
) -> list[_OurProgram]:
    """Open the device programs attached directly to the cgroup that carry our name."""
    if program_ids is None:
        program_ids = bpf.query_programs(cgroup_fd, bpf.BPF_CGROUP_DEVICE).program_ids
    ours = []
    for program_id in program_ids:
        try:
            fd = bpf.program_fd_by_id(program_id)
        except BpfSyscallError as error:
            if error.errno == errno.ENOENT:
                continue  # detached and freed since the query: not there to manage
            raise
        try:
            info = bpf.program_info(fd)
        except BaseException:
            bpf.close_fd(fd)
            raise
        if info.name == PROGRAM_NAME and info.program_type == bpf.BPF_PROG_TYPE_CGROUP_DEVICE:
            closing.callback(bpf.close_fd, fd)
            ours.append(_OurProgram(program_id, fd))
        else:
            bpf.close_fd(fd)
    return ours


def _detach_ignoring_gone(cgroup_fd: int, program: _OurProgram) -> None:
    try:
        bpf.detach_program(cgroup_fd, program.fd, bpf.BPF_CGROUP_DEVICE)
    except BpfSyscallError as error:
        if error.errno != errno.ENOENT:
            raise
