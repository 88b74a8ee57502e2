"""Arbitrary bytes as DIR/state, DIR/topology and DIR/health: the library answers with return
codes and never crashes, and whatever it accepts keeps its invariants.

The library runs in a worker process that survives from one example to the next; a crash there
fails the example that caused it instead of killing pytest. The same corpus also runs through
the AddressSanitizer build (`make asan`), which turns silent memory errors into crashes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.dcmisim.dcmi import (
    DCMI_OK,
    DEVICE_NOT_EXIST,
    HEALTH_DEVICE_NOT_EXIST,
    INNER_ERR,
    INVALID_PARAMETER,
    NOT_READY,
    REPO,
    SIM_SOURCE,
    new_sim_dir,
)
from tests.fuzzing import MUTATIONS, fuzz, mutate

TOPOLOGY = b"npu 0 910ProB card=0 phy=2\nnpu 1 910B4 card=1 phy=0\n"
# A valid state of that topology: two vNPUs on each chip.
SEED_STATE = b"""dcmi-sim-state 1
id 0123456789abcdef
serial 4
npu 0 910ProB 0 2
npu 1 910B4 1 0
vnpu 0 132 vir16 0xffff 1
vnpu 0 133 vir08 0xff0000 2
vnpu 1 100 vir10_3c_16g 0x3ff 3
vnpu 1 101 vir05_1c_8g 0x7c00 4
end
"""
SEED_HEALTH = b"0 health 2\n0 error 0x80E01801\n1 error 7\n1 lost 0\n0 temperature_c 80\n"
SEED_TOPOLOGY = b"npu 0 910B3 card=3 phy=5\nnpu 1 910A\n# comment\nnpu 2 910B4 phy=9\n"
DOCUMENTED_CODES = {DCMI_OK, INVALID_PARAMETER, DEVICE_NOT_EXIST, INNER_ERR, NOT_READY, -8255}

WORKER = r"""
import ctypes, json, os, sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from tests.dcmisim import dcmi
lib = dcmi.load(Path({library!r}))

def chip(card):
    total, free = dcmi.SocTotalResource(), dcmi.SocFreeResource()
    size = ctypes.c_uint(ctypes.sizeof(total))
    codes = [lib.dcmi_get_device_info(card, 0, 52, 1, ctypes.byref(total), ctypes.byref(size))]
    size = ctypes.c_uint(ctypes.sizeof(free))
    codes.append(lib.dcmi_get_device_info(card, 0, 52, 2, ctypes.byref(free), ctypes.byref(size)))
    vnpus = []
    for i in range(min(total.vdev_num, 32)):
        code, answer = dcmi.query(lib, card, total.vdev_id[i])
        codes.append(code)
        mask = dcmi.units(lib, card, total.vdev_id[i])
        vnpus.append([answer.query_info.computing.aic, answer.query_info.computing.memory_size,
                      mask[1], mask[2]])
    return {{"codes": codes, "total": [total.computing.aic, total.computing.memory_size,
             total.vdev_num], "free": [free.computing.aic, free.computing.memory_size],
             "vnpus": vnpus, "health": list(dcmi.health(lib, card)),
             "errors": list(dcmi.error_codes(lib, card))}}

for line in sys.stdin:
    report = {{"init": lib.dcmi_init()}}
    code, cards = dcmi.card_list(lib)
    report["cards"] = [code, cards]
    report["chips"] = [chip(card) for card in cards[:16]]
    report["create"] = dcmi.create(lib, cards[0] if cards else 0, b"vir02")[0]
    report["destroy"] = dcmi.destroy(lib, cards[0] if cards else 0, 100)
    print(json.dumps(report), flush=True)
"""


class Worker:
    """A long-lived process that re-initialises the library on the node for every example."""

    def __init__(self, directory: Path, library: Path, preload: str | None) -> None:
        self.directory = directory
        self.command = [sys.executable, "-c", WORKER.format(repo=str(REPO), library=str(library))]
        self.env = {**os.environ, "DCMI_SIM_DIR": str(directory), "DCMI_SIM_FSYNC": "0"}
        self.env.pop("DCMI_SIM_TOPOLOGY", None)
        if preload is not None:
            self.env["LD_PRELOAD"] = preload
            self.env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1"
        self.process = self.start()

    def start(self) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.command,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if os.environ.get("DCMISIM_FUZZ_STDERR") else subprocess.DEVNULL,
            text=True,
        )

    def run(self, files: dict[str, bytes | None]) -> dict[str, Any]:
        for name, data in files.items():
            path = self.directory / name
            if data is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(data)
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write("go\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            # Restart for the next example, so Hypothesis can shrink a crash to its smallest input.
            status = self.process.wait()
            self.close()
            self.process = self.start()
            raise AssertionError(f"the library crashed (worker exit status {status}) on {files!r}")
        report: dict[str, Any] = json.loads(line)
        return report

    def close(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()
        self.process.wait(timeout=60)


def asan_runtime() -> str | None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    path = subprocess.run(
        [compiler, "-print-file-name=libasan.so"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return path if Path(path).is_absolute() and Path(path).exists() else None


@pytest.fixture(scope="module", params=["plain", "asan"])
def worker(request: pytest.FixtureRequest, dcmi_library: object) -> Iterator[Worker]:
    preload = None
    library = SIM_SOURCE / "build" / "libdcmi.so"
    if request.param == "asan":
        preload = asan_runtime()
        if preload is None:
            pytest.skip("the C compiler has no libasan.so to preload for the sanitizer build")
        built = subprocess.run(
            ["make", "-s", "-C", str(SIM_SOURCE), "asan"],
            capture_output=True,
            text=True,
            check=False,
        )
        if built.returncode != 0:
            pytest.fail(f"make asan failed:\n{built.stdout}\n{built.stderr}")
        library = SIM_SOURCE / "build" / "asan" / "libdcmi.so"
    directory = new_sim_dir()
    running = Worker(directory, library, preload)
    try:
        yield running
    finally:
        running.close()
        shutil.rmtree(directory, ignore_errors=True)


def check_invariants(report: dict[str, Any]) -> None:
    assert report["init"] in (DCMI_OK, INNER_ERR)
    card_code, cards = report["cards"]
    assert card_code in DOCUMENTED_CODES
    assert report["create"] in DOCUMENTED_CODES and report["destroy"] in DOCUMENTED_CODES
    if report["init"] != DCMI_OK:
        assert card_code == INNER_ERR and cards == []
        return
    assert card_code == DCMI_OK and 1 <= len(cards) <= 16 and len(set(cards)) == len(cards)
    for chip in report["chips"]:
        assert set(chip["codes"]) <= {DCMI_OK, DEVICE_NOT_EXIST}
        if chip["codes"][0] != DCMI_OK:
            continue  # a lost chip
        total_aic, total_memory, count = chip["total"]
        used_aic = sum(vnpu[0] for vnpu in chip["vnpus"])
        used_memory = sum(vnpu[1] for vnpu in chip["vnpus"])
        assert count <= 16 and used_aic <= total_aic and used_memory <= total_memory
        assert chip["free"] == [total_aic - used_aic, total_memory - used_memory]
        masks = [vnpu[2] for vnpu in chip["vnpus"]]
        assert all(
            bin(mask).count("1") == vnpu[0] for mask, vnpu in zip(masks, chip["vnpus"], strict=True)
        )
        assert sum(bin(mask).count("1") for mask in masks) == bin(sum(masks)).count("1")
        health_code, health = chip["health"]
        assert health_code == DCMI_OK and health in (0, 1, 2, 3, HEALTH_DEVICE_NOT_EXIST)
        error_code, errors = chip["errors"]
        assert error_code in (DCMI_OK, DEVICE_NOT_EXIST) and len(errors) <= 128


def test_the_seeds_are_valid(worker: Worker) -> None:
    report = worker.run({"topology": TOPOLOGY, "state": SEED_STATE, "health": SEED_HEALTH})
    assert report["init"] == DCMI_OK
    assert [chip["total"][2] for chip in report["chips"]] == [2, 2]
    check_invariants(report)
    report = worker.run({"topology": SEED_TOPOLOGY, "state": None, "health": None})
    assert report["cards"] == [DCMI_OK, [3, 1, 2]]


STATES = st.binary(max_size=1024) | st.builds(mutate, st.just(SEED_STATE), MUTATIONS)


@fuzz(300)
@given(data=STATES)
def test_any_state_file_gives_return_codes(worker: Worker, data: bytes) -> None:
    report = worker.run({"topology": TOPOLOGY, "state": data, "health": None})
    check_invariants(report)
    if report["init"] == DCMI_OK:
        # Whatever was accepted is written back only in a form that is accepted again.
        again = worker.run({})
        assert again["init"] == DCMI_OK
        check_invariants(again)


HEALTHS = st.binary(max_size=1024) | st.builds(mutate, st.just(SEED_HEALTH), MUTATIONS)


@fuzz(150)
@given(data=HEALTHS)
def test_any_health_file_gives_return_codes(worker: Worker, data: bytes) -> None:
    report = worker.run({"topology": TOPOLOGY, "state": SEED_STATE, "health": data})
    assert report["init"] == DCMI_OK
    check_invariants(report)


TOPOLOGIES = st.binary(max_size=512) | st.builds(mutate, st.just(SEED_TOPOLOGY), MUTATIONS)


@fuzz(150)
@given(data=TOPOLOGIES)
def test_any_topology_file_gives_return_codes(worker: Worker, data: bytes) -> None:
    report = worker.run({"topology": data, "state": None, "health": None})
    check_invariants(report)


# ---- structured states: the parser's validation against a plain reading of the rules ---------

# (model, physical id, AI Cores, AI CPUs, HBM MB, templates: name -> (cores, cpus, counted))
CHIPS = [
    ("910ProB", 2, 30, 14, 32768, {"vir02": (2, 1, False), "vir04": (4, 1, False),
                                   "vir08": (8, 3, False), "vir16": (16, 7, False)}),
    ("910B4", 0, 20, 7, 32768, {"vir10_3c_16g": (10, 3, True), "vir10_4c_16g_m": (10, 4, True),
                                "vir10_3c_16g_nm": (10, 3, True), "vir05_1c_8g": (5, 1, True)}),
]  # fmt: skip
TEMPLATE_NAMES = sorted({name for chip in CHIPS for name in chip[5]})


def reference_accepts(serial: int, vnpus: list[tuple[int, int, str, int, int]]) -> bool:
    used: dict[int, list[tuple[str, int]]] = {0: [], 1: []}
    slots: set[tuple[int, int]] = set()
    for logic, vdev_id, name, mask, vnpu_serial in vnpus:
        if logic > 1:
            return False
        _, phy, cores, cpus, hbm, templates = CHIPS[logic]
        slot = vdev_id - (100 + 16 * phy)
        if not 0 <= slot < 16 or (logic, slot) in slots or name not in templates:
            return False
        template_cores = templates[name][0]
        taken = 0
        for _, owned in used[logic]:
            taken |= owned
        if mask >= 1 << cores or bin(mask).count("1") != template_cores or mask & taken:
            return False
        placed = [*used[logic], (name, mask)]
        if sum(templates[n][0] for n, _ in placed) > cores:
            return False
        if sum(templates[n][1] for n, _ in placed if templates[n][2]) > cpus:
            return False
        if sum(hbm * templates[n][0] // cores for n, _ in placed) > hbm:
            return False
        if not 1 <= vnpu_serial <= serial:
            return False
        slots.add((logic, slot))
        used[logic] = placed
    return True


@st.composite
def vnpu_records(draw: st.DrawFn, serial: int) -> tuple[int, int, str, int, int]:
    """Mostly what the library would write; each field is off one time in ten."""

    def off() -> bool:
        # sampled_from shrinks towards its first element: towards records that are right.
        return draw(st.sampled_from([False] * 9 + [True]))

    logic = 2 if off() else draw(st.integers(0, 1))
    _, phy, cores, _, _, templates = CHIPS[min(logic, 1)]
    slot = draw(st.sampled_from([-1, 16])) if off() else draw(st.integers(0, 15))
    name = draw(st.sampled_from([*TEMPLATE_NAMES, "vir32"] if off() else sorted(templates)))
    size = templates[name][0] if name in templates else 4
    if off():
        mask = draw(st.integers(0, 2**32))
    else:
        mask = ((1 << size) - 1) << (size * draw(st.integers(0, cores // size - 1)))
    vnpu_serial = draw(st.sampled_from([0, serial + 1])) if off() else draw(st.integers(1, serial))
    return logic, 100 + 16 * phy + slot, name, mask, vnpu_serial


@st.composite
def structured_states(draw: st.DrawFn) -> tuple[bytes, bool]:
    serial = draw(st.integers(1, 8))
    vnpus = draw(st.lists(vnpu_records(serial), max_size=6))
    lines = [
        "dcmi-sim-state 1",
        "id 0123456789abcdef",
        f"serial {serial}",
        "npu 0 910ProB 0 2",
        "npu 1 910B4 1 0",
        *(f"vnpu {chip} {v} {n} {hex(m)} {s}" for chip, v, n, m, s in vnpus),
        "end",
    ]  # fmt: skip
    return ("\n".join(lines) + "\n").encode(), reference_accepts(serial, vnpus)


@fuzz(300)
@given(case=structured_states())
def test_states_are_accepted_exactly_when_the_rules_hold(
    worker: Worker, case: tuple[bytes, bool]
) -> None:
    data, valid = case
    report = worker.run({"topology": TOPOLOGY, "state": data, "health": None})
    assert (report["init"] == DCMI_OK) == valid, data.decode()
    check_invariants(report)
