"""Who holds a device node, asked of the kernel in one pass: BPF task iterators.

The /proc census (agent/isolation/census.py) costs one ``stat`` per open descriptor of the node,
about 2.5 us each: half a second on a node with 200,000 descriptors, on every release. The
kernel can walk them itself: a BPF program of type ``BPF_PROG_TYPE_TRACING`` attached as the
``task_file`` iterator runs once per open file of every task (threads that share their
process's file table are skipped), and the ``task_vma`` iterator once per memory map
(kernel/bpf/task_iter.c, Documentation/bpf/bpf_iterators.rst, Linux 5.8 and 5.12). Ours compares
the file's inode with the partition's device numbers and writes a 16-byte record for each match:

    u32 rdev (the kernel's encoding, major << 20 | minor), u32 fd (or ~0 for a mapping),
    u32 pid (the process's id in the agent's PID namespace, or ~0 if deeper than we unroll),
    u32 zero

Both iterators walk the tasks of the PID namespace of whoever creates the iterator, as /proc
shows them. No task is unreadable to the kernel, so the census no longer depends on
CAP_SYS_PTRACE or on what a security module hides in /proc.

Invariants:
- the structure layouts come from this kernel's BTF (agent/isolation/btf.py), never from
  constants; a kernel without BTF, without the iterators or a capability that the load needs
  raises :class:`HolderIteratorError`, and the caller falls back to /proc;
- every census proves itself: while it runs, the caller holds an ``O_PATH`` descriptor on one of
  the nodes and the agent maps ``/dev/zero`` privately (the canaries), and a census that does
  not report both as the agent's own is refused (:class:`HolderIteratorError`), so a wrong
  offset, a pid in the wrong namespace or an iterator that skipped ``O_PATH`` files cannot pass
  as "no holders";
- a record with an untranslatable pid fails the census the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from agent.errors import BpfSyscallError, IsolationError
from agent.isolation import bpf
from agent.isolation.bpf import R0, R1, R2, R3, Instruction
from agent.isolation.btf import Btf

BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_ITER = 28  # enum bpf_attach_type
BPF_FUNC_SEQ_WRITE = 127
BPF_FUNC_GET_CURRENT_TASK_BTF = 158
# include/linux/pid_namespace.h MAX_PID_NS_LEVEL; the program unrolls one load per level.
MAX_PID_NS_LEVEL = 32
_S_IFMT, _S_IFCHR = 0o170000, 0o020000
_KERNEL_MINOR_BITS = 20  # include/linux/kdev_t.h MINORBITS
_RECORD = struct.Struct("<IIII")
MAPPING = 0xFFFFFFFF  # the fd field of a mapping's record
_UNTRANSLATED = 0xFFFFFFFF
# Programs are licensed GPL for the kernel's purposes: bpf_seq_write is a GPL-only helper.
_LICENSE = "GPL"
_READ_CHUNK = 1 << 16
ZERO = "/dev/zero"


class HolderIteratorError(IsolationError):
    """The kernel cannot answer (or answered something unproven): use the /proc census."""


@dataclass(frozen=True)
class _Layout:
    """Byte offsets of what the programs read, for this kernel."""

    file_fn: int
    vma_fn: int
    ctx_meta: int
    ctx_task: int
    ctx_fd: int
    ctx_file: int
    vma_ctx_vma: int
    meta_seq: int
    vma_file: int
    file_inode: int
    inode_mode: int
    inode_rdev: int
    task_leader: int
    task_pid: int
    pid_level: int
    pid_numbers: int
    upid_size: int
    upid_nr: int

    @classmethod
    def of(cls, btf: Btf) -> _Layout:
        return cls(
            file_fn=btf.function("bpf_iter_task_file"),
            vma_fn=btf.function("bpf_iter_task_vma"),
            ctx_meta=btf.offset("bpf_iter__task_file", "meta"),
            ctx_task=btf.offset("bpf_iter__task_file", "task"),
            ctx_fd=btf.offset("bpf_iter__task_file", "fd"),
            ctx_file=btf.offset("bpf_iter__task_file", "file"),
            vma_ctx_vma=btf.offset("bpf_iter__task_vma", "vma"),
            meta_seq=btf.offset("bpf_iter_meta", "seq"),
            vma_file=btf.offset("vm_area_struct", "vm_file"),
            file_inode=btf.offset("file", "f_inode"),
            inode_mode=btf.offset("inode", "i_mode"),
            inode_rdev=btf.offset("inode", "i_rdev"),
            task_leader=btf.offset("task_struct", "group_leader"),
            task_pid=btf.offset("task_struct", "thread_pid"),
            pid_level=btf.offset("pid", "level"),
            pid_numbers=btf.offset("pid", "numbers"),
            upid_size=btf.struct_size("upid"),
            upid_nr=btf.offset("upid", "nr"),
        )


_layout_lock = threading.Lock()
_layout: _Layout | HolderIteratorError | None = None


def _kernel_layout() -> _Layout:
    """This kernel's layout, read once per process (parsing its BTF takes about 0.1 s)."""
    global _layout  # noqa: PLW0603 - one kernel per process
    with _layout_lock:
        if _layout is None:
            try:
                _layout = _Layout.of(Btf.of_kernel())
            except IsolationError as error:
                _layout = HolderIteratorError(f"no holder iterator: {error}")
        if isinstance(_layout, HolderIteratorError):
            raise _layout
        return _layout


def kernel_rdev(st_rdev: int) -> int:
    """A userspace device number as the kernel's ``dev_t`` (what ``inode->i_rdev`` holds)."""
    return (os.major(st_rdev) << _KERNEL_MINOR_BITS) | os.minor(st_rdev)


# --- the programs ------------------------------------------------------------------------------

_LDX_DW, _LDX_W, _LDX_H = 0x79, 0x61, 0x69
_STX_W, _ST_W = 0x63, 0x62
_MOV64_X, _MOV64_K, _AND64_K, _ADD64_K = 0xBF, 0xB7, 0x57, 0x07
_JEQ_K, _JNE_K, _JA, _CALL, _EXIT = 0x15, 0x55, 0x05, 0x85, 0x95
_JEQ32_K = 0x16  # BPF_JMP32: compares the low 32 bits, so a dev_t above 2^31 matches too
R6, R7, R8, R9, R10 = 6, 7, 8, 9, 10  # callee-saved and the frame pointer (bpf.py has R0-R5)


class _Assembler:
    """Instructions with forward jumps to named labels."""

    def __init__(self) -> None:
        self.code: list[Instruction | tuple[int, int, int, str]] = []
        self.labels: dict[str, int] = {}

    def emit(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> None:
        self.code.append(Instruction(code, dst, src, off, imm))

    def jump(self, code: int, dst: int, imm: int, label: str) -> None:
        self.code.append((code, dst, imm, label))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def assemble(self) -> list[Instruction]:
        out = []
        for index, item in enumerate(self.code):
            if isinstance(item, Instruction):
                out.append(item)
            else:
                code, dst, imm, label = item
                out.append(Instruction(code, dst, 0, self.labels[label] - index - 1, imm))
        return out


def program(layout: _Layout, maps: bool, rdevs: Iterable[int]) -> list[Instruction]:
    """The task_file (``maps`` False) or task_vma program matching kernel ``rdevs``."""
    a = _Assembler()
    a.emit(_MOV64_X, R6, R1)
    if maps:
        a.emit(_LDX_DW, R7, R6, layout.vma_ctx_vma)
        a.jump(_JEQ_K, R7, 0, "out")
        a.emit(_LDX_DW, R7, R7, layout.vma_file)
    else:
        a.emit(_LDX_DW, R7, R6, layout.ctx_file)
    a.jump(_JEQ_K, R7, 0, "out")
    a.emit(_LDX_DW, R8, R7, layout.file_inode)
    a.jump(_JEQ_K, R8, 0, "out")
    a.emit(_LDX_H, R2, R8, layout.inode_mode)
    a.emit(_AND64_K, R2, imm=_S_IFMT)
    a.jump(_JNE_K, R2, _S_IFCHR, "out")
    a.emit(_LDX_W, R8, R8, layout.inode_rdev)
    for rdev in sorted(set(rdevs)):
        a.jump(_JEQ32_K, R8, rdev - (1 << 32) if rdev >= 1 << 31 else rdev, "hit")
    a.jump(_JA, 0, 0, "out")
    a.label("hit")
    a.emit(_STX_W, R10, R8, -16)
    if maps:
        a.emit(_ST_W, R10, 0, -12, -1)
    else:
        a.emit(_LDX_W, R2, R6, layout.ctx_fd)
        a.emit(_STX_W, R10, R2, -12)
    a.emit(_ST_W, R10, 0, -4, 0)
    # The iterator walks the namespace of the reader (this very task): its level says which
    # of the process's pid numbers is the one /proc and os.kill use here.
    a.emit(_CALL, imm=BPF_FUNC_GET_CURRENT_TASK_BTF)
    a.emit(_LDX_DW, R0, R0, layout.task_pid)
    a.emit(_LDX_W, R9, R0, layout.pid_level)
    a.emit(_LDX_DW, R2, R6, layout.ctx_task)
    a.jump(_JEQ_K, R2, 0, "out")
    a.emit(_LDX_DW, R2, R2, layout.task_leader)
    a.emit(_LDX_DW, R2, R2, layout.task_pid)
    for level in range(MAX_PID_NS_LEVEL):
        a.jump(_JNE_K, R9, level, f"level{level + 1}")
        offset = layout.pid_numbers + level * layout.upid_size + layout.upid_nr
        a.emit(_LDX_W, R3, R2, offset)
        a.jump(_JA, 0, 0, "store")
        a.label(f"level{level + 1}")
    a.emit(_MOV64_K, R3, imm=-1)
    a.label("store")
    a.emit(_STX_W, R10, R3, -8)
    a.emit(_LDX_DW, R1, R6, layout.ctx_meta)
    a.emit(_LDX_DW, R1, R1, layout.meta_seq)
    a.emit(_MOV64_X, R2, R10)
    a.emit(_ADD64_K, R2, imm=-16)
    a.emit(_MOV64_K, R3, imm=_RECORD.size)
    a.emit(_CALL, imm=BPF_FUNC_SEQ_WRITE)
    a.label("out")
    a.emit(_MOV64_K, R0, imm=0)
    a.emit(_EXIT)
    return a.assemble()


# --- loading and running -----------------------------------------------------------------------


class _LinkCreateAttr(ctypes.Structure):
    _fields_ = (
        ("prog_fd", ctypes.c_uint32),
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iter_info", ctypes.c_uint64),
        ("iter_info_len", ctypes.c_uint32),
    )


class _IterCreateAttr(ctypes.Structure):
    _fields_ = (("link_fd", ctypes.c_uint32), ("flags", ctypes.c_uint32))


# The programs by what they look for: loading one (the verifier, 3 ms) was nine tenths of a
# census, and a node releases the same partitions again and again. Each run still proves itself.
_kept = bpf.KeptPrograms(64)


def _load(instructions: list[Instruction], attach_btf_id: int, name: str) -> int:
    try:
        return bpf.load_program(
            BPF_PROG_TYPE_TRACING, instructions, name, _LICENSE, (BPF_TRACE_ITER, attach_btf_id)
        )
    except BpfSyscallError as error:
        raise HolderIteratorError(str(error)) from error


def _run(program_fd: int) -> bytes:
    link = _LinkCreateAttr()
    link.prog_fd = program_fd
    link.attach_type = BPF_TRACE_ITER
    with bpf.owned_fd(bpf.call(bpf.BPF_LINK_CREATE, link, "linking the holder iterator")) as fd:
        iterator = _IterCreateAttr()
        iterator.link_fd = fd
        with bpf.owned_fd(bpf.call(bpf.BPF_ITER_CREATE, iterator, "opening the iterator")) as it:
            chunks = []
            while chunk := os.read(it, _READ_CHUNK):
                chunks.append(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class HeldNode:
    pid: int
    rdev: int  # the kernel's encoding, as given to ``holders``
    fd: int | None  # None: a memory map


def holders(rdevs: Iterable[int], canary_fd: int) -> list[HeldNode]:
    """Every descriptor and mapping of a character device in ``rdevs`` (kernel encoding) in
    this PID namespace, the agent's own included; blocking (run it in a thread).

    ``canary_fd`` is an open descriptor of this process on one of ``rdevs``, and for the length
    of the call this process maps ``/dev/zero`` (a private mapping keeps the device file): the
    answer is refused unless both are reported as this process's. Raises HolderIteratorError
    (the caller falls back to /proc)."""
    wanted = sorted(set(rdevs))
    layout = _kernel_layout()
    found: list[HeldNode] = []
    with _mapped_canary() as zero:
        try:
            for maps, function, name in (
                (False, layout.file_fn, "ag_holder_fd"),
                (True, layout.vma_fn, "ag_holder_vma"),
            ):
                matched = [*wanted, zero] if maps else wanted
                _, descriptor = _kept.get(
                    (maps, tuple(matched)),
                    lambda: _load(program(layout, maps, matched), function, name),  # noqa: B023
                )
                with bpf.owned_fd(descriptor) as fd:
                    found += _records(_run(fd), maps, matched)
        except BpfSyscallError as error:
            raise HolderIteratorError(str(error)) from error
    own = [h for h in found if h.pid == os.getpid()]
    for what, proven in (
        (f"descriptor {canary_fd}", any(h.fd == canary_fd for h in own)),
        ("mapping of /dev/zero", any(h.fd is None and h.rdev == zero for h in own)),
    ):
        if not proven:
            raise HolderIteratorError(
                f"the iterator did not report the agent's own {what}: its answer is not trusted"
            )
    return [h for h in found if h.rdev in wanted]


def _records(raw: bytes, maps: bool, matched: list[int]) -> list[HeldNode]:
    if len(raw) % _RECORD.size:
        raise HolderIteratorError(f"the iterator wrote {len(raw)} bytes, not whole records")
    found = []
    for rdev, fd, pid, _ in _RECORD.iter_unpack(raw):
        if pid in (_UNTRANSLATED, 0) or rdev not in matched:
            raise HolderIteratorError(
                f"the iterator reported pid {pid} for device {rdev:#x}: untranslatable"
            )
        found.append(HeldNode(pid, rdev, None if maps and fd == MAPPING else fd))
    return found


@contextlib.contextmanager
def _mapped_canary() -> Iterator[int]:
    """Maps /dev/zero privately for the block (the mapping keeps the device as its file, which
    shared mappings do not); yields its kernel device number."""
    try:
        descriptor = os.open(ZERO, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise HolderIteratorError(f"cannot open {ZERO} for the census's proof: {error}") from error
    try:
        rdev = os.fstat(descriptor).st_rdev
        mapping = mmap.mmap(descriptor, mmap.PAGESIZE, mmap.MAP_PRIVATE, mmap.PROT_READ)
    except (OSError, ValueError) as error:
        raise HolderIteratorError(f"cannot map {ZERO} for the census's proof: {error}") from error
    finally:
        os.close(descriptor)
    try:
        yield kernel_rdev(rdev)
    finally:
        mapping.close()
