"""The kernel's census of device holders (BPF task iterators) against the /proc census, on real
processes and the real kernel: the two must agree, the kernel's must prove itself or be refused,
and without the capabilities it needs the census falls back to /proc instead of failing or
answering "nobody"."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.hw.devnodes import DeviceNode
from agent.isolation import bpf, holder_iter
from agent.isolation.btf import VMLINUX, Btf, BtfError
from agent.isolation.census import NodeTargets, take_census
from agent.isolation.holder_iter import HolderIteratorError, kernel_rdev
from tests.support import ready_child

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    not VMLINUX.exists(), reason=f"the kernel publishes no BTF ({VMLINUX}): /proc census only"
)

NOBODY = 65534
# Character device numbers no driver of the test machine uses (mem stops at minor 12), one with a
# major above 2047: its kernel dev_t is above 2^31 and must still match.
UNUSED = (1, 240)
HIGH = (4000, 7)
ZERO = (1, 5)  # /dev/zero: the one device a test can map (privately, keeping its file)

# Holds the inherited descriptors (the node files are below root's 0700 temporary directory, so
# another user could not open them by path); maps and then closes the ones listed in argv[1].
HOLD = """
import mmap, os, signal, sys
held = []
for descriptor in sys.argv[1].split(","):
    if descriptor:
        held.append(mmap.mmap(int(descriptor), 4096, mmap.MAP_PRIVATE, mmap.PROT_READ))
        os.close(int(descriptor))  # only the mapping holds it now
print("ready", flush=True)
signal.pause()
"""


def _node(path: Path, numbers: tuple[int, int]) -> DeviceNode:
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(*numbers))
    return DeviceNode(path, *numbers)


@contextmanager
def holder(
    opened: list[Path], mapped: tuple[Path, ...] = (), user: int | None = None
) -> Iterator[subprocess.Popen[str]]:
    prefix = [] if user is None else [
        "setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--"
    ]  # fmt: skip
    descriptors = [os.open(path, os.O_PATH) for path in opened]
    to_map = [os.open(path, os.O_RDONLY) for path in mapped]
    try:
        process = subprocess.Popen(
            [*prefix, sys.executable, "-c", HOLD, ",".join(map(str, to_map))],
            stdout=subprocess.PIPE, text=True, pass_fds=(*descriptors, *to_map),
        )  # fmt: skip
    finally:
        for descriptor in (*descriptors, *to_map):
            os.close(descriptor)
    with ready_child(process):
        yield process


def _held(census_holders: dict[int, object]) -> dict[int, set[str]]:
    return {
        pid: {str(node.path) for node in holder.nodes}  # type: ignore[attr-defined]
        for pid, holder in census_holders.items()
    }


@pytest.fixture
def nodes(tmp_path: Path) -> dict[str, DeviceNode]:
    return {
        "cap": _node(tmp_path / "nvidia-cap-a", UNUSED),
        "copy": _node(tmp_path / "private-copy", UNUSED),
        "high": _node(tmp_path / "high", HIGH),
        "zero": _node(tmp_path / "zero", ZERO),
    }


def test_the_kernel_and_proc_agree_on_every_kind_of_holder(nodes: dict[str, DeviceNode]) -> None:
    cap, copy, high, zero = nodes["cap"], nodes["copy"], nodes["high"], nodes["zero"]
    targets = NodeTargets.of([cap, high, zero], [])
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        with (
            holder([copy.path], user=NOBODY) as by_copy,  # another user, through a mknod copy
            holder([high.path]) as by_high,
            holder([], (zero.path,)) as by_mapping,
        ):
            kernel = take_census(targets, use_kernel=True)
            proc = take_census(targets, use_kernel=False)
            assert kernel.method == "kernel", "the kernel census fell back to /proc"
            expected = {
                by_copy.pid: {str(cap.path)},
                by_high.pid: {str(high.path)},
                by_mapping.pid: {str(zero.path)},
            }
            # Other processes of the machine may map /dev/zero too; ours must be exactly so.
            assert {p: n for p, n in _held(kernel.holders).items() if p in expected} == expected
            assert _held(kernel.holders) == _held(proc.holders)
            assert bystander.pid not in kernel.holders and os.getpid() not in kernel.holders
            assert kernel.holders[by_copy.pid].uid == NOBODY
    finally:
        bystander.kill()
        bystander.wait(timeout=30)


NESTED = """
import json, os, sys
from pathlib import Path
from agent.hw.devnodes import DeviceNode
from agent.isolation.census import NodeTargets, take_census
node = DeviceNode(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
ready, signal_ready = os.pipe()
child = os.fork()
if child == 0:
    held = os.open(sys.argv[1], os.O_PATH)
    os.write(signal_ready, b"!")
    import signal; signal.pause()
os.read(ready, 1)
census = take_census(NodeTargets.of([node], []))
os.kill(child, 9)
print(json.dumps({"method": census.method, "holders": sorted(census.holders), "child": child}))
"""


@pytest.mark.parametrize("depth", [1, 2])
def test_pids_are_those_of_the_agents_own_namespace(
    nodes: dict[str, DeviceNode], depth: int
) -> None:
    """The iterator reports the pid /proc and kill() use in the agent's namespace, however deep."""
    cap = nodes["cap"]
    nest = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"] * depth
    result = subprocess.run(
        [*nest, sys.executable, "-c", NESTED, str(cap.path), str(cap.major), str(cap.minor)],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=True,
    )  # fmt: skip
    report = json.loads(result.stdout.splitlines()[-1])
    assert report == {"method": "kernel", "holders": [report["child"]], "child": report["child"]}


def test_an_answer_that_does_not_prove_itself_is_refused(nodes: dict[str, DeviceNode]) -> None:
    cap = nodes["cap"]
    unrelated = os.open("/dev/null", os.O_PATH)
    try:
        with pytest.raises(HolderIteratorError, match="did not report the agent's own descriptor"):
            holder_iter.holders([kernel_rdev(os.makedev(cap.major, cap.minor))], unrelated)
    finally:
        os.close(unrelated)


CENSUS = """
import json, sys
from pathlib import Path
from agent.hw.devnodes import DeviceNode
from agent.isolation.census import NodeTargets, take_census
node = DeviceNode(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
census = take_census(NodeTargets.of([node], []))
print(json.dumps({"method": census.method, "holders": sorted(census.holders)}))
"""


def test_without_bpf_capabilities_the_census_reads_proc(nodes: dict[str, DeviceNode]) -> None:
    cap = nodes["cap"]
    with holder([cap.path]) as process:
        result = subprocess.run(
            ["setpriv", "--bounding-set=-sys_admin,-bpf,-perfmon", "--", sys.executable, "-c",
             CENSUS, str(cap.path), str(cap.major), str(cap.minor)],
            capture_output=True, text=True, timeout=120, cwd=REPO, check=True,
        )  # fmt: skip
    # The census's own log lines go to stdout first; its answer is the last line.
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "method": "proc",
        "holders": [process.pid],
    }
    assert "holder_iterator_unavailable" in result.stdout + result.stderr


# --- the kernel's BTF --------------------------------------------------------------------------


def test_the_kernels_btf_gives_the_iterator_context_layouts() -> None:
    """The iterator contexts are fixed by the kernel's DEFINE_BPF_ITER_FUNC: pointers, then fd."""
    btf = Btf.of_kernel()
    assert [btf.offset("bpf_iter__task_file", m) for m in ("meta", "task", "fd", "file")] == [
        0, 8, 16, 24,
    ]  # fmt: skip
    assert btf.offset("inode", "i_mode") == 0
    with pytest.raises(BtfError, match="no member 'no_such_member'"):
        btf.offset("inode", "no_such_member")
    with pytest.raises(BtfError, match="no function"):
        btf.function("bpf_iter_no_such_target")


def _blob(types: bytes, strings: bytes) -> bytes:
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


def test_members_of_anonymous_unions_are_found_at_their_real_offset() -> None:
    strings = b"\0int\0outer\0a\0b\0c\0"
    name = {n: strings.index(n.encode() + b"\0") for n in ("int", "outer", "a", "b", "c")}
    types = b"".join([
        struct.pack("<IIII", name["int"], 1 << 24, 4, 32),  # 1: int
        # 2: union { int b; int c; } (anonymous)
        struct.pack("<III", 0, (5 << 24) | 2, 4)
        + struct.pack("<III", name["b"], 1, 0) + struct.pack("<III", name["c"], 1, 0),
        # 3: struct outer { int a; union {...}; } with the union at byte 8
        struct.pack("<III", name["outer"], (4 << 24) | 2, 12)
        + struct.pack("<III", name["a"], 1, 0) + struct.pack("<III", 0, 2, 64),
    ])  # fmt: skip
    btf = Btf(_blob(types, strings))
    assert (btf.offset("outer", "a"), btf.offset("outer", "c"), btf.struct_size("outer")) == (
        0, 8, 12,
    )  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.integers(0, 64))
def test_arbitrary_bytes_are_parsed_or_refused_with_btf_error(data: bytes, keep: int) -> None:
    # Behind a valid header the type section's parser sees the bytes too, whole or cut short.
    framed = _blob(data, b"\0a\0")
    for blob in (data, framed, framed[: 24 + keep]):
        try:
            btf = Btf(blob)
        except BtfError:
            continue
        with contextlib.suppress(BtfError):
            btf.offset("a", "a")
        with contextlib.suppress(BtfError):
            btf.function("a")


def test_attribute_layouts_match_the_kernels_union_bpf_attr() -> None:
    """Offsets from include/uapi/linux/bpf.h: a wrong one makes the kernel read zero or garbage."""
    load, link = bpf.ProgLoadBtfAttr, holder_iter._LinkCreateAttr
    assert (load.prog_btf_fd.offset, load.func_info.offset, load.line_info.offset) == (72, 80, 96)
    assert (load.attach_btf_id.offset, load.attach_btf_obj_fd.offset) == (108, 112)
    assert (link.attach_type.offset, link.iter_info.offset, link.iter_info_len.offset) == (
        8,
        16,
        24,
    )
