"""The bpf(2) system call through ctypes, and an eBPF instruction encoder.

Only what a cgroup device fence needs: load a program, attach/replace/detach it on a cgroup,
list what is attached, and read a program's name and instructions back. Layouts follow
include/uapi/linux/bpf.h (``union bpf_attr``, ``struct bpf_insn``, ``struct bpf_prog_info``);
each ctypes structure below is a prefix of the kernel's, which the kernel accepts because it
zero-fills the rest (kernel/bpf/syscall.c, bpf_check_uabi).

Every failure becomes a :class:`BpfSyscallError` (an IsolationError) naming the command, the
errno and what it means for a device fence; no OSError leaves this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

from agent.errors import BpfSyscallError, IsolationError

# --- constants from include/uapi/linux/bpf.h -------------------------------------------------

BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_ITER_CREATE = 33

BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6  # enum bpf_attach_type

BPF_F_ALLOW_OVERRIDE = 1 << 0
BPF_F_ALLOW_MULTI = 1 << 1
BPF_F_REPLACE = 1 << 2

BPF_OBJ_NAME_LEN = 16
BPF_TAG_SIZE = 8

# struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }
# access_type = (BPF_DEVCG_ACC_* << 16) | BPF_DEVCG_DEV_*
BPF_DEVCG_ACC_MKNOD = 1 << 0
BPF_DEVCG_ACC_READ = 1 << 1
BPF_DEVCG_ACC_WRITE = 1 << 2
BPF_DEVCG_DEV_BLOCK = 1 << 0
BPF_DEVCG_DEV_CHAR = 1 << 1

# Instruction classes, operations and sources (the low byte of struct bpf_insn).
BPF_LDX = 0x01
BPF_ALU = 0x04
BPF_JMP = 0x05
BPF_W = 0x00
BPF_MEM = 0x60
BPF_K = 0x00
BPF_X = 0x08
BPF_AND = 0x50
BPF_RSH = 0x70
BPF_MOV = 0xB0
BPF_JNE = 0x50
BPF_EXIT = 0x90

R0, R1, R2, R3, R4, R5 = range(6)

# __NR_bpf; x86_64 has its own table, arm64 and riscv64 use asm-generic/unistd.h.
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "arm64": 280, "riscv64": 280}

_VERIFIER_LOG_SIZE = 1 << 20
_LOAD_RETRIES_ON_EAGAIN = 5


# --- instructions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """``struct bpf_insn``: u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm (little-endian)."""

    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0

    SIZE: ClassVar[int] = 8
    _FORMAT: ClassVar[str] = "<BBhi"

    def encode(self) -> bytes:
        # On little-endian targets the dst_reg bit-field is the low nibble.
        return struct.pack(self._FORMAT, self.code, (self.src << 4) | self.dst, self.off, self.imm)

    @classmethod
    def decode(cls, raw: bytes) -> Instruction:
        code, registers, off, imm = struct.unpack(cls._FORMAT, raw)
        return cls(code, registers & 0x0F, registers >> 4, off, imm)


def load_word(dst: int, src: int, off: int) -> Instruction:
    """``dst = *(u32 *)(src + off)``, zero-extended to 64 bits."""
    return Instruction(BPF_LDX | BPF_MEM | BPF_W, dst, src, off)


def alu32_imm(operation: int, dst: int, imm: int) -> Instruction:
    return Instruction(BPF_ALU | operation | BPF_K, dst, 0, 0, imm)


def mov32_reg(dst: int, src: int) -> Instruction:
    return Instruction(BPF_ALU | BPF_MOV | BPF_X, dst, src)


def jump_imm(operation: int, dst: int, imm: int, off: int) -> Instruction:
    """``if (dst <op> imm) goto pc + 1 + off``."""
    return Instruction(BPF_JMP | operation | BPF_K, dst, 0, off, imm)


def jump_reg(operation: int, dst: int, src: int, off: int) -> Instruction:
    return Instruction(BPF_JMP | operation | BPF_X, dst, src, off)


def exit_program() -> Instruction:
    return Instruction(BPF_JMP | BPF_EXIT)


def encode_program(instructions: Sequence[Instruction]) -> bytes:
    return b"".join(instruction.encode() for instruction in instructions)


def decode_program(raw: bytes) -> tuple[Instruction, ...]:
    if len(raw) % Instruction.SIZE:
        raise IsolationError(
            f"eBPF program of {len(raw)} bytes is not a whole number of "
            f"{Instruction.SIZE}-byte instructions"
        )
    return tuple(
        Instruction.decode(raw[offset : offset + Instruction.SIZE])
        for offset in range(0, len(raw), Instruction.SIZE)
    )


# --- union bpf_attr prefixes -----------------------------------------------------------------


class ProgLoadAttr(ctypes.Structure):
    _fields_ = (
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
    )


class ProgLoadBtfAttr(ProgLoadAttr):
    """``union bpf_attr`` for BPF_PROG_LOAD up to ``attach_btf_obj_fd`` (ctypes appends these
    fields to ProgLoadAttr's): a program that attaches to a kernel function named by its BTF id
    (tracing programs such as iterators)."""

    _fields_ = (  # type: ignore[assignment]  # more fields, not ProgLoadAttr's 12 again
        ("prog_btf_fd", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("func_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("line_info_cnt", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("attach_btf_obj_fd", ctypes.c_uint32),
    )


class ProgAttachAttr(ctypes.Structure):
    _fields_ = (
        ("target_fd", ctypes.c_uint32),
        ("attach_bpf_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("replace_bpf_fd", ctypes.c_uint32),
    )


class ProgQueryAttr(ctypes.Structure):
    _fields_ = (
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("query_flags", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("prog_ids", ctypes.c_uint64),
        ("prog_cnt", ctypes.c_uint32),
        ("_padding", ctypes.c_uint32),
        ("prog_attach_flags", ctypes.c_uint64),
    )


class GetFdByIdAttr(ctypes.Structure):
    _fields_ = (
        ("prog_id", ctypes.c_uint32),
        ("next_id", ctypes.c_uint32),
        ("open_flags", ctypes.c_uint32),
    )


class ObjInfoAttr(ctypes.Structure):
    _fields_ = (
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    )


class ProgInfo(ctypes.Structure):
    """Prefix of ``struct bpf_prog_info`` up to and including ``name``."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * BPF_TAG_SIZE),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
    )


# --- errors ----------------------------------------------------------------------------------

_COMMAND_NAMES = {
    BPF_PROG_LOAD: "BPF_PROG_LOAD",
    BPF_PROG_ATTACH: "BPF_PROG_ATTACH",
    BPF_PROG_DETACH: "BPF_PROG_DETACH",
    BPF_PROG_GET_FD_BY_ID: "BPF_PROG_GET_FD_BY_ID",
    BPF_OBJ_GET_INFO_BY_FD: "BPF_OBJ_GET_INFO_BY_FD",
    BPF_PROG_QUERY: "BPF_PROG_QUERY",
    BPF_LINK_CREATE: "BPF_LINK_CREATE",
    BPF_ITER_CREATE: "BPF_ITER_CREATE",
}

# What an errno means for each command, in terms an operator can act on (kernel/bpf/syscall.c,
# kernel/bpf/cgroup.c).
_MEANINGS: dict[tuple[int, int], str] = {
    (
        BPF_PROG_LOAD,
        errno.EPERM,
    ): "loading BPF programs needs CAP_BPF and CAP_SYS_ADMIN (run the agent as root)",
    (BPF_PROG_LOAD, errno.EACCES): "the kernel verifier rejected the program",
    (BPF_PROG_LOAD, errno.EINVAL): "the kernel rejected the program or its attributes",
    (BPF_PROG_LOAD, errno.E2BIG): "the program has too many instructions (too many device rules)",
    (
        BPF_PROG_LOAD,
        errno.ENOMEM,
    ): "out of kernel memory, or RLIMIT_MEMLOCK too low on kernels before 5.11",
    (BPF_PROG_ATTACH, errno.EPERM): (
        "a program on this cgroup or one of its ancestors was attached without "
        "BPF_F_ALLOW_MULTI, so the kernel refuses more programs; accelguard never detaches "
        "programs it did not attach: ask whoever attached it to use BPF_F_ALLOW_MULTI"
    ),
    (BPF_PROG_ATTACH, errno.EBADF): "the target is not a cgroup v2 directory",
    (BPF_PROG_ATTACH, errno.ENOENT): "the program to be replaced is no longer attached",
    (BPF_PROG_ATTACH, errno.EEXIST): "the program is already attached to this cgroup",
    (
        BPF_PROG_ATTACH,
        errno.E2BIG,
    ): "the cgroup already has the maximum number of device programs (64)",
    (BPF_PROG_ATTACH, errno.EINVAL): "the kernel rejected the attach flags or program type",
    (BPF_PROG_DETACH, errno.ENOENT): "the program is not attached to this cgroup",
    (BPF_PROG_DETACH, errno.EBADF): "the target is not a cgroup v2 directory",
    (BPF_PROG_QUERY, errno.EBADF): "the target is not a cgroup v2 directory",
    (
        BPF_PROG_QUERY,
        errno.EPERM,
    ): "querying cgroup programs needs CAP_NET_ADMIN (run the agent as root)",
    (BPF_PROG_GET_FD_BY_ID, errno.ENOENT): "no program with that id exists any more",
    (
        BPF_PROG_GET_FD_BY_ID,
        errno.EPERM,
    ): "opening programs by id needs CAP_SYS_ADMIN (run the agent as root)",
}


def _error(command: int, error_number: int, what: str, detail: str = "") -> BpfSyscallError:
    name = _COMMAND_NAMES.get(command, f"bpf command {command}")
    meaning = _MEANINGS.get((command, error_number), os.strerror(error_number))
    code = errno.errorcode.get(error_number, str(error_number))
    message = f"{what}: {name} failed with {code}: {meaning}"
    if detail:
        message = f"{message}\n{detail}"
    return BpfSyscallError(name, error_number, message)


# --- the system call -------------------------------------------------------------------------


def _syscall_number() -> int:
    machine = platform.machine()
    try:
        return _SYS_BPF[machine]
    except KeyError:
        raise IsolationError(
            f"bpf(2) syscall number unknown for architecture {machine!r}: "
            "cgroup v2 fencing is unavailable"
        ) from None


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(command: int, attr: ctypes.Structure) -> int:
    """Call bpf(2); return its result or raise OSError carrying the errno."""
    ctypes.set_errno(0)
    result = _libc.syscall(
        ctypes.c_long(_syscall_number()),
        ctypes.c_int(command),
        ctypes.byref(attr),
        ctypes.c_uint(ctypes.sizeof(attr)),
    )
    if result < 0:
        error_number = ctypes.get_errno()
        raise OSError(error_number, os.strerror(error_number))
    return int(result)


def call(command: int, attr: ctypes.Structure, what: str) -> int:
    """bpf(2) ``command`` for the modules that build their own attributes; BpfSyscallError."""
    try:
        return _bpf(command, attr)
    except OSError as error:
        raise _error(command, error.errno or 0, what) from error


# --- operations ------------------------------------------------------------------------------


def load_program(
    program_type: int,
    instructions: Sequence[Instruction],
    name: str,
    license_name: str,
    attach: tuple[int, int] | None = None,
) -> int:
    """Load a program and return its fd; a verifier rejection includes the verifier's log.
    ``attach``: (expected attach type, BTF id of the kernel function) for a tracing program.

    The first attempt runs without a log (cheap, and the log buffer cannot overflow); only a
    rejection is retried with ``log_level = 1`` to explain it, as libbpf does.
    """
    if not name or len(name) >= BPF_OBJ_NAME_LEN or not all(c.isalnum() or c in "_." for c in name):
        # bpf_obj_name_cpy accepts only [A-Za-z0-9_.], at most 15 characters.
        raise IsolationError(f"BPF program name {name!r} is invalid: at most 15 of [A-Za-z0-9_.]")
    code = encode_program(instructions)
    code_buffer = ctypes.create_string_buffer(code, len(code))
    license_buffer = ctypes.create_string_buffer(license_name.encode("ascii"))

    def attempt(log: ctypes.Array[ctypes.c_char] | None) -> int:
        attr: ProgLoadAttr | ProgLoadBtfAttr = (
            ProgLoadAttr() if attach is None else ProgLoadBtfAttr()
        )
        if isinstance(attr, ProgLoadBtfAttr) and attach is not None:
            attr.expected_attach_type, attr.attach_btf_id = attach
        attr.prog_type = program_type
        attr.insn_cnt = len(instructions)
        attr.insns = ctypes.addressof(code_buffer)
        attr.license = ctypes.addressof(license_buffer)
        attr.prog_name = name.encode("ascii")
        if log is not None:
            attr.log_level = 1
            attr.log_size = len(log)
            attr.log_buf = ctypes.addressof(log)
        for _ in range(_LOAD_RETRIES_ON_EAGAIN):
            try:
                return _bpf(BPF_PROG_LOAD, attr)
            except OSError as error:
                # The verifier returns EAGAIN when interrupted by a signal; libbpf retries too.
                if error.errno != errno.EAGAIN:
                    raise
        return _bpf(BPF_PROG_LOAD, attr)

    what = f"loading BPF program {name!r} ({len(instructions)} instructions)"
    try:
        return attempt(None)
    except OSError as first:
        if first.errno not in (errno.EACCES, errno.EINVAL):
            raise _error(BPF_PROG_LOAD, first.errno or 0, what) from first
    log = ctypes.create_string_buffer(_VERIFIER_LOG_SIZE)
    try:
        descriptor = attempt(log)
    except OSError as second:
        verifier_log = log.value.decode("utf-8", "replace").strip()
        detail = f"verifier log:\n{verifier_log}" if verifier_log else ""
        raise _error(BPF_PROG_LOAD, second.errno or 0, what, detail) from second
    # Loaded with the log on although it failed without: not expected, but the program is valid.
    return descriptor


def attach_program(
    cgroup_fd: int, program_fd: int, attach_type: int, flags: int, replace_fd: int | None = None
) -> None:
    attr = ProgAttachAttr()
    attr.target_fd = cgroup_fd
    attr.attach_bpf_fd = program_fd
    attr.attach_type = attach_type
    attr.attach_flags = flags
    if replace_fd is not None:
        attr.attach_flags |= BPF_F_REPLACE
        attr.replace_bpf_fd = replace_fd
    try:
        _bpf(BPF_PROG_ATTACH, attr)
    except OSError as error:
        raise _error(BPF_PROG_ATTACH, error.errno or 0, "attaching the device program") from error


def detach_program(cgroup_fd: int, program_fd: int, attach_type: int) -> None:
    attr = ProgAttachAttr()
    attr.target_fd = cgroup_fd
    attr.attach_bpf_fd = program_fd
    attr.attach_type = attach_type
    try:
        _bpf(BPF_PROG_DETACH, attr)
    except OSError as error:
        raise _error(BPF_PROG_DETACH, error.errno or 0, "detaching the device program") from error


@dataclass(frozen=True)
class AttachedPrograms:
    """What BPF_PROG_QUERY reports for one cgroup and attach type (not inherited ones)."""

    attach_flags: int
    program_ids: tuple[int, ...]


def query_programs(cgroup_fd: int, attach_type: int) -> AttachedPrograms:
    capacity = 64  # BPF_CGROUP_MAX_PROGS; grown below if a future kernel allows more
    while True:
        ids = (ctypes.c_uint32 * capacity)()
        attr = ProgQueryAttr()
        attr.target_fd = cgroup_fd
        attr.attach_type = attach_type
        attr.prog_ids = ctypes.addressof(ids)
        attr.prog_cnt = capacity
        try:
            _bpf(BPF_PROG_QUERY, attr)
        except OSError as error:
            # ENOSPC: more programs than room; prog_cnt now holds the real count.
            if error.errno == errno.ENOSPC and attr.prog_cnt > capacity:
                capacity = attr.prog_cnt
                continue
            raise _error(
                BPF_PROG_QUERY, error.errno or 0, "listing the cgroup's device programs"
            ) from error
        return AttachedPrograms(attr.attach_flags, tuple(ids[: attr.prog_cnt]))


def program_fd_by_id(program_id: int) -> int:
    attr = GetFdByIdAttr()
    attr.prog_id = program_id
    try:
        return _bpf(BPF_PROG_GET_FD_BY_ID, attr)
    except OSError as error:
        raise _error(
            BPF_PROG_GET_FD_BY_ID, error.errno or 0, f"opening BPF program id {program_id}"
        ) from error


@dataclass(frozen=True)
class ProgramInfo:
    program_id: int
    program_type: int
    name: str
    tag: bytes
    # None when the kernel withholds the translated instructions (bpf_dump_raw_ok false).
    instructions: bytes | None


def program_info(program_fd: int, with_instructions: bool = False) -> ProgramInfo:
    what = "reading a BPF program's info"
    info = ProgInfo()
    _object_info(program_fd, info, what)
    instructions = None
    if with_instructions and info.xlated_prog_len:
        buffer = ctypes.create_string_buffer(info.xlated_prog_len)
        length = info.xlated_prog_len
        info = ProgInfo()
        info.xlated_prog_len = length
        info.xlated_prog_insns = ctypes.addressof(buffer)
        _object_info(program_fd, info, what)
        if info.xlated_prog_insns and info.xlated_prog_len == length:
            instructions = buffer.raw[:length]
    return ProgramInfo(
        program_id=info.id,
        program_type=info.type,
        name=info.name.decode("ascii", "replace"),
        tag=bytes(info.tag),
        instructions=instructions,
    )


def _object_info(program_fd: int, info: ProgInfo, what: str) -> None:
    attr = ObjInfoAttr()
    attr.bpf_fd = program_fd
    attr.info_len = ctypes.sizeof(info)
    attr.info = ctypes.addressof(info)
    try:
        _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    except OSError as error:
        raise _error(BPF_OBJ_GET_INFO_BY_FD, error.errno or 0, what) from error


def close_fd(descriptor: int) -> None:
    with contextlib.suppress(OSError):
        os.close(descriptor)


@contextlib.contextmanager
def owned_fd(descriptor: int) -> Iterator[int]:
    """Close ``descriptor`` when the block ends, whatever happens in it."""
    try:
        yield descriptor
    finally:
        close_fd(descriptor)


class KeptPrograms:
    """Loaded programs kept open by key, so that a program needed again is not loaded again.

    A program is immutable once loaded, so the verifier and the JIT (most of what loading one
    costs) need run once per key: a device fence's rule set (one program attached to every
    cgroup that needs it), a census's target devices. The least recently used is closed beyond
    ``size``; the kernel frees it once nothing else holds it.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._programs: OrderedDict[Hashable, tuple[int, int]] = OrderedDict()

    def get(self, key: Hashable, load: Callable[[], int]) -> tuple[int, int]:
        """(program id, a descriptor of the caller's own, which it closes: a kept one may be
        closed by another thread meanwhile); ``load`` returns a new program's descriptor."""
        with self._lock:
            kept = self._programs.get(key)
            if kept is None:
                descriptor = load()
                try:
                    kept = (program_info(descriptor).program_id, descriptor)
                except BaseException:
                    close_fd(descriptor)
                    raise
                self._programs[key] = kept
                while len(self._programs) > self._size:
                    close_fd(self._programs.popitem(last=False)[1][1])
            else:
                self._programs.move_to_end(key)
            return kept[0], os.dup(kept[1])
