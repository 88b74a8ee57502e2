"""Fuzzing of the files nvml-sim reads (topology, processes, health, xid) through pynvml.

Each C parser is checked against a plain Python reading of the same contract: for any bytes, the
library must neither crash nor disagree with the reference about what the file says.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pynvml
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.nvmlsim.simdir import DEFAULT_TOPOLOGY, new_state_dir, write_topology

MODELS = {
    b"H100-80GB": "NVIDIA H100 80GB HBM3",
    b"A100-40GB": "NVIDIA A100-SXM4-40GB",
    b"A100-80GB": "NVIDIA A100-SXM4-80GB",
}
NOT_AVAILABLE = 0xFFFFFFFF
U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF


# ---- the reference reading of the file contracts --------------------------------------------


def tokens(line: bytes, buffer: int, most: int) -> list[bytes] | None:
    """Whitespace-separated fields after '#' comments; None for an unreadable line."""
    line = line.split(b"#", 1)[0]
    if len(line) >= buffer or b"\0" in line:
        return None
    fields = [field for field in re.split(rb"[ \t\r]+", line) if field]
    return None if len(fields) > most else fields


def number(field: bytes, most: int) -> int | None:
    if not 0 < len(field) <= 20 or not all(48 <= c <= 57 for c in field):
        return None
    value = int(field)
    return value if value <= most else None


def number_or_minus_one(field: bytes, most: int) -> int | None:
    return NOT_AVAILABLE if field == b"-1" else number(field, most)


def reference_topology(data: bytes) -> list[str] | None:
    """GPU names by index, or None when nvmlInit must refuse the topology."""
    gpus: dict[int, str] = {}
    for line in data.split(b"\n"):
        fields = tokens(line, 512, 4)
        if fields == []:
            continue
        if fields is None or len(fields) != 4 or fields[0] != b"gpu":
            return None
        index = number(fields[1], 7)
        if index is None or index in gpus or fields[2] not in MODELS:
            return None
        if fields[3] not in (b"mig=0", b"mig=1"):
            return None
        gpus[index] = MODELS[fields[2]]
    if sorted(gpus) != list(range(len(gpus))):
        return None
    return [gpus[i] for i in range(len(gpus))]


def alive(pid: int) -> bool:
    if pid == 0:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except (ProcessLookupError, OverflowError):
        return False
    return True


def reference_processes(data: bytes) -> list[tuple[int, int, int, int, int]]:
    """(pid, gpu, gi, ci, used) of the live processes the file lists, in file order."""
    found = []
    for line in data.split(b"\n"):
        fields = tokens(line, 256, 5)
        if fields is None or len(fields) != 5:
            continue
        pid, gpu = number(fields[0], 0x7FFFFFFF), number(fields[1], 1000)
        gi, ci = number_or_minus_one(fields[2], 14), number_or_minus_one(fields[3], 8)
        used = number(fields[4], U64)
        if None in (pid, gpu, gi, ci, used) or (gi == NOT_AVAILABLE) != (ci == NOT_AVAILABLE):
            continue
        assert pid is not None and gpu is not None and gi is not None and ci is not None
        assert used is not None
        if alive(pid):
            found.append((pid, gpu, gi, ci, used))
    return found


HEALTH_KEYS = {
    b"temperature_c": (U32, 35),
    b"power_mw": (U32, 70000),
    b"ecc_volatile_corrected": (U64, 0),
    b"ecc_volatile_uncorrected": (U64, 0),
    b"ecc_aggregate_corrected": (U64, 0),
    b"ecc_aggregate_uncorrected": (U64, 0),
    b"remapped_correctable": (U32, 0),
    b"remapped_uncorrectable": (U32, 0),
    b"remapping_pending": (U32, 0),
    b"remapping_failure": (U32, 0),
    b"clocks_event_reasons": (U64, 0),
    b"lost": (1, 0),
}


def reference_health(data: bytes, gpu: int) -> dict[bytes, int]:
    values = {key: default for key, (_, default) in HEALTH_KEYS.items()}
    for line in data.split(b"\n"):
        fields = tokens(line, 256, 3)
        if fields is None or len(fields) != 3 or number(fields[0], 1000) != gpu:
            continue
        if fields[1] in HEALTH_KEYS:
            value = number(fields[2], HEALTH_KEYS[fields[1]][0])
            if value is not None:
                values[fields[1]] = value
    return values


def reference_xids(data: bytes, gpus: set[int]) -> list[tuple[int, int, int, int]]:
    """(gpu, xid, gi, ci) of the complete lines for registered GPUs, in order."""
    events = []
    for line in data.split(b"\n")[:-1]:  # an unterminated last line is not an event yet
        fields = tokens(line, 256, 4)
        if fields is None or len(fields) not in (2, 4):
            continue
        gpu, xid = number(fields[0], 1000), number(fields[1], U64)
        gi = ci = NOT_AVAILABLE
        if len(fields) == 4:
            gi_value = number_or_minus_one(fields[2], U32)
            ci_value = number_or_minus_one(fields[3], U32)
            if gi_value is None or ci_value is None:
                continue
            gi, ci = gi_value, ci_value
        if gpu is None or xid is None or gpu not in gpus:
            continue
        events.append((gpu, xid, gi, ci))
    return events


# ---- generators -------------------------------------------------------------------------------
# Lines are drawn from pools built once from every combination of interesting field values
# (valid, off by one, malformed) and joined by varied whitespace; one draw per line keeps
# Hypothesis fast enough for thousands of files per parser.

SEPARATORS = [b" ", b"\t", b"  ", b" \t ", b"\r"]
NUMBERS = [b"0", b"1", b"2", b"3", b"7", b"8", b"13", b"14", b"15", b"-1", b"007", b"+1", b"1e3",
           b"99999999999999999999999", b"18446744073709551615", b"18446744073709551616",
           b"4294967295", b"4294967296", b"x"]  # fmt: skip
COMMENTS = [b"", b"# note", b"#", b" # gpu 0 H100-80GB mig=1"]


def pool(*choices: list[bytes]) -> list[bytes]:
    lines = []
    for fields in itertools.product(*choices):
        for k, separator in enumerate(SEPARATORS):
            comment = COMMENTS[k % len(COMMENTS)]
            lines.append(separator.join(fields) + comment)
    return lines


def file_of(lines: list[bytes], most: int = 8) -> st.SearchStrategy[bytes]:
    line = st.one_of(st.sampled_from(lines), st.sampled_from(COMMENTS), st.binary(max_size=24))
    return st.tuples(st.lists(line, max_size=most), st.booleans()).map(
        lambda pair: b"\n".join(pair[0]) + (b"\n" if pair[1] else b"")
    )


TOPOLOGY_LINES = pool(
    [b"gpu", b"GPU", b"gpus"],
    [b"0", b"1", b"2", b"3", b"7", b"8", b"-1", b"007", b"x", b""],
    [*MODELS, b"V100-16GB", b"h100-80gb"],
    [b"mig=0", b"mig=1", b"mig=2", b"mig=", b"mig"],
) + pool([b"gpu"], [b"0", b"1", b"2"], list(MODELS), [b"mig=0", b"mig=1"], [b"extra"])


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


PIDS = [str(pid).encode() for pid in (os.getpid(), 1, _dead_pid(), 0)] + [b"-5", b"2147483648"]
PROCESS_LINES = pool(
    PIDS,
    [b"0", b"1", b"2", b"1001", b"x"],
    [b"-1", b"0", b"3", b"14", b"15", b"x"],
    [b"-1", b"0", b"8", b"9"],
    [b"0", b"1073741824", b"18446744073709551615", b"18446744073709551616", b"-1"],
) + pool(PIDS[:2], [b"0"], [b"-1"], [b"-1"], [b"1"], [b"extra"])
HEALTH_LINES = pool(
    [b"0", b"1", b"2", b"00", b"-1", b"x"],
    [*HEALTH_KEYS, b"temperature", b"fan_speed"],
    NUMBERS,
)
XID_LINES = (
    pool([b"0", b"1", b"2", b"9", b"x", b"-1"], NUMBERS)
    + pool([b"0", b"2"], [b"79", b"48", b"x"], NUMBERS, [b"-1", b"0", b"4294967295", b"4294967296"])
    + pool([b"0"], [b"79"], [b"1"])
)


@pytest.fixture(scope="module")
def fuzz_dir() -> Iterator[Path]:
    path = new_state_dir()
    saved = os.environ.get("NVML_SIM_DIR")
    os.environ["NVML_SIM_DIR"] = str(path)
    try:
        yield path
    finally:
        if saved is None:
            os.environ.pop("NVML_SIM_DIR", None)
        else:
            os.environ["NVML_SIM_DIR"] = saved
        shutil.rmtree(path, ignore_errors=True)


@settings(max_examples=1200, deadline=None)
@given(data=file_of(TOPOLOGY_LINES))
def test_topology_parser_agrees_with_the_reference(
    nvml_library: object, fuzz_dir: Path, data: bytes
) -> None:
    os.environ["NVML_SIM_DIR"] = str(fuzz_dir)
    (fuzz_dir / "topology").write_bytes(data)
    expected = reference_topology(data)
    if expected is None:
        with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
            pynvml.nvmlInit()
        return
    pynvml.nvmlInit()
    try:
        count = pynvml.nvmlDeviceGetCount()
        names = [
            pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)
        ]
        assert names == expected
    finally:
        pynvml.nvmlShutdown()


@pytest.fixture(scope="module")
def live_node(nvml_library: object) -> Iterator[Path]:
    """One initialised node shared by the examples of the control-file fuzzers below."""
    path = new_state_dir()
    write_topology(path, DEFAULT_TOPOLOGY)
    saved = os.environ.get("NVML_SIM_DIR")
    os.environ["NVML_SIM_DIR"] = str(path)
    pynvml.nvmlInit()
    try:
        yield path
    finally:
        pynvml.nvmlShutdown()
        if saved is None:
            os.environ.pop("NVML_SIM_DIR", None)
        else:
            os.environ["NVML_SIM_DIR"] = saved
        shutil.rmtree(path, ignore_errors=True)


@settings(max_examples=1000, deadline=None)
@given(data=file_of(PROCESS_LINES))
def test_processes_parser_agrees_with_the_reference(live_node: Path, data: bytes) -> None:
    (live_node / "processes").write_bytes(data)
    expected = reference_processes(data)
    for gpu in range(3):
        handle = pynvml.nvmlDeviceGetHandleByIndex(gpu)
        got = [
            (p.pid, gpu, p.gpuInstanceId, p.computeInstanceId, p.usedGpuMemory)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        ]
        # pynvml reports NVML_VALUE_NOT_AVAILABLE (all ones) as None.
        assert got == [(*p[:4], None if p[4] == U64 else p[4]) for p in expected if p[1] == gpu]
        total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
        used = sum(p[4] for p in expected if p[1] == gpu)
        assert pynvml.nvmlDeviceGetMemoryInfo(handle).used == min(used, total)
    (live_node / "processes").unlink()


@settings(max_examples=600, deadline=None)
@given(data=file_of(HEALTH_LINES))
def test_health_parser_agrees_with_the_reference(live_node: Path, data: bytes) -> None:
    (live_node / "health").write_bytes(data)
    for gpu in range(3):
        expected = reference_health(data, gpu)
        if expected[b"lost"]:
            with pytest.raises(pynvml.NVMLError_GpuIsLost):
                pynvml.nvmlDeviceGetHandleByIndex(gpu)
            continue
        handle = pynvml.nvmlDeviceGetHandleByIndex(gpu)
        assert pynvml.nvmlDeviceGetTemperature(handle, 0) == expected[b"temperature_c"]
        assert pynvml.nvmlDeviceGetPowerUsage(handle) == expected[b"power_mw"]
        assert (
            pynvml.nvmlDeviceGetTotalEccErrors(handle, 0, 0)
            == (expected[b"ecc_volatile_corrected"])
        )
        assert (
            pynvml.nvmlDeviceGetTotalEccErrors(handle, 1, 1)
            == (expected[b"ecc_aggregate_uncorrected"])
        )
        assert pynvml.nvmlDeviceGetRemappedRows(handle) == (
            expected[b"remapped_correctable"],
            expected[b"remapped_uncorrectable"],
            expected[b"remapping_pending"],
            expected[b"remapping_failure"],
        )
        assert (
            pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle)
            == (expected[b"clocks_event_reasons"])
        )
    (live_node / "health").unlink()


@settings(max_examples=600, deadline=None)
@given(data=file_of(XID_LINES))
def test_xid_parser_agrees_with_the_reference(live_node: Path, data: bytes) -> None:
    event_set = pynvml.nvmlEventSetCreate()
    try:
        for gpu in (0, 2):
            handle = pynvml.nvmlDeviceGetHandleByIndex(gpu)
            pynvml.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, event_set)
        with (live_node / "xid").open("ab") as xid:
            xid.write(data)
        events = []
        while True:
            try:
                event = pynvml.nvmlEventSetWait_v2(event_set, 0)
            except pynvml.NVMLError_Timeout:
                break
            events.append(
                (
                    pynvml.nvmlDeviceGetIndex(event.device),
                    event.eventData,
                    event.gpuInstanceId,
                    event.computeInstanceId,
                )
            )
        assert events == reference_xids(data, {0, 2})
    finally:
        pynvml.nvmlEventSetFree(event_set)
        (live_node / "xid").unlink(missing_ok=True)
