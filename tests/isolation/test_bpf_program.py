"""The eBPF encoder, bpf(2) structure layouts, and the generated device program.

Layout offsets are the ones in include/uapi/linux/bpf.h; a wrong offset would make the kernel
read a zero or a garbage field, so they are pinned here. Generated programs are loaded into the
real kernel so its verifier, not our opinion, decides they are valid.
"""

from __future__ import annotations

import ctypes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import IsolationError
from agent.isolation import bpf
from agent.isolation.cgroup_v2 import (
    PREAMBLE,
    PROGRAM_LICENSE,
    device_program,
    rules_from_program,
)
from agent.isolation.rules import (
    MAX_MAJOR,
    MAX_MINOR,
    DeviceRule,
    baseline_rules,
    normalise,
    parse_rule,
)

accesses = st.frozensets(st.sampled_from("rwm"), min_size=1)
device_rules = st.one_of(
    st.builds(
        DeviceRule,
        st.sampled_from(["c", "b"]),
        st.one_of(st.none(), st.integers(0, MAX_MAJOR)),
        st.one_of(st.none(), st.integers(0, MAX_MINOR)),
        accesses,
    ),
    st.builds(DeviceRule, st.just("a"), st.none(), st.none(), accesses),
)


@pytest.mark.parametrize(
    ("structure", "offsets", "size"),
    [
        (
            bpf.ProgLoadAttr,
            {
                "prog_type": 0,
                "insn_cnt": 4,
                "insns": 8,
                "license": 16,
                "log_level": 24,
                "log_size": 28,
                "log_buf": 32,
                "kern_version": 40,
                "prog_flags": 44,
                "prog_name": 48,
                "prog_ifindex": 64,
                "expected_attach_type": 68,
            },
            72,
        ),
        (
            bpf.ProgAttachAttr,
            {
                "target_fd": 0,
                "attach_bpf_fd": 4,
                "attach_type": 8,
                "attach_flags": 12,
                "replace_bpf_fd": 16,
            },
            20,
        ),
        (
            bpf.ProgQueryAttr,
            {
                "target_fd": 0,
                "attach_type": 4,
                "query_flags": 8,
                "attach_flags": 12,
                "prog_ids": 16,
                "prog_cnt": 24,
                "prog_attach_flags": 32,
            },
            40,
        ),
        (bpf.GetFdByIdAttr, {"prog_id": 0, "next_id": 4, "open_flags": 8}, 12),
        (bpf.ObjInfoAttr, {"bpf_fd": 0, "info_len": 4, "info": 8}, 16),
        (
            bpf.ProgInfo,
            {
                "type": 0,
                "id": 4,
                "tag": 8,
                "jited_prog_len": 16,
                "xlated_prog_len": 20,
                "jited_prog_insns": 24,
                "xlated_prog_insns": 32,
                "load_time": 40,
                "created_by_uid": 48,
                "nr_map_ids": 52,
                "map_ids": 56,
                "name": 64,
            },
            80,
        ),
    ],
)
def test_attr_layouts_match_uapi(
    structure: type[ctypes.Structure], offsets: dict[str, int], size: int
) -> None:
    for field, offset in offsets.items():
        assert getattr(structure, field).offset == offset, field
    assert ctypes.sizeof(structure) == size


@pytest.mark.parametrize(
    ("instruction", "encoded"),
    [
        (bpf.load_word(bpf.R2, bpf.R1, 0), "6112000000000000"),
        (bpf.load_word(bpf.R5, bpf.R1, 8), "6115080000000000"),
        (bpf.alu32_imm(bpf.BPF_AND, bpf.R2, 0xFFFF), "54020000ffff0000"),
        (bpf.alu32_imm(bpf.BPF_RSH, bpf.R3, 16), "7403000010000000"),
        (bpf.alu32_imm(bpf.BPF_MOV, bpf.R0, 1), "b400000001000000"),
        (bpf.mov32_reg(bpf.R1, bpf.R3), "bc31000000000000"),
        (bpf.jump_imm(bpf.BPF_JNE, bpf.R4, 195, 3), "55040300c3000000"),
        (bpf.jump_reg(bpf.BPF_JNE, bpf.R1, bpf.R3, 2), "5d31020000000000"),
        (bpf.exit_program(), "9500000000000000"),
    ],
)
def test_instruction_encoding(instruction: bpf.Instruction, encoded: str) -> None:
    assert instruction.encode().hex() == encoded
    assert bpf.Instruction.decode(bytes.fromhex(encoded)) == instruction


def test_program_shape_for_one_rule() -> None:
    program = device_program([parse_rule("c 195:0 rw")])
    block = program[len(PREAMBLE) : -2]
    assert block == (
        bpf.jump_imm(bpf.BPF_JNE, bpf.R2, bpf.BPF_DEVCG_DEV_CHAR, 7),
        bpf.mov32_reg(bpf.R1, bpf.R3),
        bpf.alu32_imm(bpf.BPF_AND, bpf.R1, bpf.BPF_DEVCG_ACC_READ | bpf.BPF_DEVCG_ACC_WRITE),
        bpf.jump_reg(bpf.BPF_JNE, bpf.R1, bpf.R3, 4),
        bpf.jump_imm(bpf.BPF_JNE, bpf.R4, 195, 3),
        bpf.jump_imm(bpf.BPF_JNE, bpf.R5, 0, 2),
        bpf.alu32_imm(bpf.BPF_MOV, bpf.R0, 1),
        bpf.exit_program(),
    )
    assert program[-2:] == (bpf.alu32_imm(bpf.BPF_MOV, bpf.R0, 0), bpf.exit_program())


def test_wildcards_and_full_access_skip_their_checks() -> None:
    # c 136:* rwm: type and major only; a *:* m: access only; a *:* rwm: allow and stop.
    assert device_program([parse_rule("c 136:* rwm")])[len(PREAMBLE) : -2] == (
        bpf.jump_imm(bpf.BPF_JNE, bpf.R2, bpf.BPF_DEVCG_DEV_CHAR, 3),
        bpf.jump_imm(bpf.BPF_JNE, bpf.R4, 136, 2),
        bpf.alu32_imm(bpf.BPF_MOV, bpf.R0, 1),
        bpf.exit_program(),
    )
    assert device_program([parse_rule("a *:* m")])[len(PREAMBLE) : -2] == (
        bpf.mov32_reg(bpf.R1, bpf.R3),
        bpf.alu32_imm(bpf.BPF_AND, bpf.R1, bpf.BPF_DEVCG_ACC_MKNOD),
        bpf.jump_reg(bpf.BPF_JNE, bpf.R1, bpf.R3, 2),
        bpf.alu32_imm(bpf.BPF_MOV, bpf.R0, 1),
        bpf.exit_program(),
    )
    everything = [parse_rule("a *:* rwm"), parse_rule("c 195:0 rw")]
    assert device_program(everything)[len(PREAMBLE) :] == (
        bpf.alu32_imm(bpf.BPF_MOV, bpf.R0, 1),
        bpf.exit_program(),
    )


def _block_starts(program: tuple[bpf.Instruction, ...]) -> set[int]:
    starts = {len(PREAMBLE)}
    for index, instruction in enumerate(program):
        if instruction == bpf.exit_program():
            starts.add(index + 1)
    return starts


@settings(max_examples=100, deadline=None)
@given(st.lists(device_rules, max_size=10))
def test_every_jump_lands_on_the_next_block(rules: list[DeviceRule]) -> None:
    program = device_program(rules)
    starts = _block_starts(program)
    for index, instruction in enumerate(program):
        if instruction.code & 0x07 == bpf.BPF_JMP and instruction != bpf.exit_program():
            target = index + 1 + instruction.off
            assert target in starts
            assert target > index


@settings(max_examples=150, deadline=None)
@given(st.lists(device_rules, max_size=10))
def test_rules_decode_from_generated_program(rules: list[DeviceRule]) -> None:
    raw = bpf.encode_program(device_program(rules))
    everything = DeviceRule("a", None, None, frozenset("rwm"))
    # "a *:* rwm" (possibly merged from several "a" rules) ends the program.
    expected = (everything,) if everything in normalise(rules) else normalise(rules)
    assert rules_from_program(raw) == expected


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200))
def test_decoder_refuses_foreign_bytes_without_raising(raw: bytes) -> None:
    decoded = rules_from_program(raw)
    if decoded is not None:
        assert bpf.encode_program(device_program(decoded)) == raw


def test_decoder_refuses_a_tampered_program() -> None:
    raw = bytearray(bpf.encode_program(device_program(baseline_rules())))
    raw[-16 + 4] = 1  # default "return 0" becomes "return 1"
    assert rules_from_program(bytes(raw)) is None


@settings(max_examples=25, deadline=None)
@given(st.lists(device_rules, max_size=40))
def test_kernel_verifier_accepts_generated_programs(rules: list[DeviceRule]) -> None:
    program = device_program(rules)
    with bpf.owned_fd(
        bpf.load_program(bpf.BPF_PROG_TYPE_CGROUP_DEVICE, program, "ag_test", PROGRAM_LICENSE)
    ) as fd:
        info = bpf.program_info(fd, with_instructions=True)
    assert info.name == "ag_test"
    assert info.program_type == bpf.BPF_PROG_TYPE_CGROUP_DEVICE
    # The kernel keeps a cgroup device program as written, so it can be read back after a restart.
    assert info.instructions == bpf.encode_program(program)


def test_verifier_rejection_carries_the_log() -> None:
    no_exit = (bpf.alu32_imm(bpf.BPF_MOV, bpf.R0, 1),)
    with pytest.raises(bpf.BpfSyscallError, match="verifier log") as caught:
        bpf.load_program(bpf.BPF_PROG_TYPE_CGROUP_DEVICE, no_exit, "ag_bad", PROGRAM_LICENSE)
    assert caught.value.command == "BPF_PROG_LOAD"


def test_reading_the_context_out_of_bounds_is_rejected() -> None:
    # struct bpf_cgroup_dev_ctx is 12 bytes; offset 12 is past it.
    program = (
        bpf.load_word(bpf.R2, bpf.R1, 12),
        bpf.alu32_imm(bpf.BPF_MOV, bpf.R0, 1),
        bpf.exit_program(),
    )
    with pytest.raises(IsolationError, match="EACCES"):
        bpf.load_program(bpf.BPF_PROG_TYPE_CGROUP_DEVICE, program, "ag_bad", PROGRAM_LICENSE)


@pytest.mark.parametrize("name", ["", "x" * 16, "bad-name", "bad name"])
def test_program_names_are_checked(name: str) -> None:
    with pytest.raises(IsolationError, match="program name"):
        bpf.load_program(bpf.BPF_PROG_TYPE_CGROUP_DEVICE, PREAMBLE, name, PROGRAM_LICENSE)


def test_missing_program_id_is_an_isolation_error() -> None:
    # Program ids are allocated upwards from 1; the largest u32 is never reached in a test run.
    with pytest.raises(bpf.BpfSyscallError, match="ENOENT") as caught:
        bpf.program_fd_by_id(0xFFFFFFFF)
    assert caught.value.errno == 2


def test_decode_rejects_partial_instructions() -> None:
    with pytest.raises(IsolationError, match="whole number"):
        bpf.decode_program(b"\x00" * 9)
