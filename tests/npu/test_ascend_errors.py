"""DCMI return codes -> accelguard errors, at the boundary and through the backend on dcmi-sim:
a lost chip, a create the chip refuses after the backend's own checks, a refused dcmi_init, a
library without the simulator's extension, and a crash at the failpoint before each mutation."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from agent.errors import (
    AccelguardError,
    GpuLostError,
    HardwareError,
    InsufficientResourcesError,
    InUseError,
)
from agent.hw.ascend import dcmi
from agent.hw.ascend.backend import AscendBackend
from agent.hw.ascend.dcmi import DcmiLibrary, check, dcmi_error
from agent.runtime.failpoints import ENVIRONMENT_VARIABLE, CrashPoint
from tests.dcmisim.dcmi import LIBRARY, REPO, SIM_SOURCE, create, new_sim_dir, topology, vnpu_ids
from tests.npu.conftest import MakeNpuNode, NpuNode

WHERE = "NPU 2 (card 2, device 0)"


@pytest.mark.parametrize(
    ("function", "code", "names_vnpu", "kind", "text"),
    [
        ("dcmi_create_vdevice", -8001, False, InsufficientResourcesError,
         "dcmi_create_vdevice failed with -8001 (DCMI_ERR_CODE_INVALID_PARAMETER): the chip has "
         "no room for the vNPU"),
        ("dcmi_set_destroy_vdevice", -8001, True, InUseError,
         "failed with -8001 (DCMI_ERR_CODE_INVALID_PARAMETER): the driver refuses to destroy a "
         "vNPU bound to a container"),
        ("dcmi_get_device_chip_info", -8008, False, GpuLostError,
         "dcmi_get_device_chip_info failed with -8008 (DCMI_ERR_CODE_DEVICE_NOT_EXIST): the NPU "
         "does not answer (lost)"),
        ("dcmi_set_destroy_vdevice", -8008, True, HardwareError,
         "failed with -8008 (DCMI_ERR_CODE_DEVICE_NOT_EXIST): the vNPU does not exist"),
        ("dcmi_get_device_hbm_info", -8001, False, HardwareError,
         "dcmi_get_device_hbm_info failed with -8001 (DCMI_ERR_CODE_INVALID_PARAMETER)"),
        ("dcmi_get_device_info", -8255, False, HardwareError,
         "dcmi_get_device_info failed with -8255 (DCMI_ERR_CODE_NOT_SUPPORT)"),
        ("dcmi_get_device_health", -8012, False, HardwareError,
         "failed with -8012 (DCMI_ERR_CODE_NOT_REDAY): DCMI is not initialised"),
        ("dcmi_init", -8005, False, HardwareError,
         "dcmi_init failed with -8005 (DCMI_ERR_CODE_INNER_ERR): is the Ascend driver loaded"),
        ("dcmi_get_card_list", -9999, False, HardwareError,
         "dcmi_get_card_list failed with -9999 (an unknown DCMI code)"),
    ],
)  # fmt: skip
def test_return_codes_become_accelguard_errors_naming_function_chip_and_code(
    function: str, code: int, names_vnpu: bool, kind: type[HardwareError], text: str
) -> None:
    error = dcmi_error(function, code, WHERE, names_vnpu=names_vnpu)
    assert type(error) is kind
    assert str(error).startswith(f"{WHERE}: ")
    assert text in str(error)
    assert "\n" not in str(error)
    with pytest.raises(kind):
        check(code, function, WHERE, names_vnpu=names_vnpu)
    check(dcmi.DCMI_OK, function, WHERE)


def test_every_documented_code_has_its_name() -> None:
    header = (SIM_SOURCE / "include" / "dcmi_interface_api.h").read_text()
    for code, name in dcmi.CODE_NAMES.items():
        assert f"#define {name} ({code})" in header or (code, name) == (0, "DCMI_OK")


def test_a_lost_npu_is_left_out_and_answers_with_gpu_lost(node910: NpuNode) -> None:
    backend = node910.backend
    backend.create_vnpu(3, "vir08")
    node910.sim.append_health("3 lost 1")
    assert [device.index for device in backend.inventory()] == [0, 1, 2, 4, 5, 6, 7]
    assert backend.chip_count() == 8
    with pytest.raises(GpuLostError) as caught:
        backend.npu(3)
    assert str(caught.value) == (
        "NPU 3 (card 3, device 0): dcmi_get_device_chip_info failed with -8008 "
        "(DCMI_ERR_CODE_DEVICE_NOT_EXIST): the NPU does not answer (lost)"
    )
    assert backend.health(3) == (0xFFFFFFFF, ())
    before = node910.counter()
    with pytest.raises(GpuLostError):
        backend.create_vnpu(3, "vir08")
    with pytest.raises(GpuLostError):
        backend.destroy_vnpu(3, 148)
    with pytest.raises(GpuLostError):
        backend.vnpus(3)
    assert node910.counter() == before
    node910.sim.append_health("3 lost 0")
    assert [v.gpu_instance_id for v in backend.npu(3).instances] == [148]


def _blocked_on(lock_path: Path) -> bool:
    """Whether some process waits for a flock on ``lock_path`` (a ``->`` line of /proc/locks)."""
    inode = f":{lock_path.stat().st_ino} "
    with Path("/proc/locks").open() as handle:
        return any("->" in line and "FLOCK" in line and inode in line for line in handle)


def test_a_create_the_chip_refuses_after_the_backends_checks_is_insufficient_resources(
    node910: NpuNode,
) -> None:
    """Another user of the chip takes its room between the backend's capacity check and its
    dcmi_create_vdevice: DCMI answers -8001, which the backend reports as no room."""
    backend, sim = node910.backend, node910.sim
    backend.create_vnpu(0, "vir16")
    outcome: list[BaseException | None] = []

    def create_second() -> None:
        try:
            backend.create_vnpu(0, "vir16")
            outcome.append(None)
        except AccelguardError as error:
            outcome.append(error)

    lock_path = sim.path / "state.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        thread = threading.Thread(target=create_second)
        thread.start()
        deadline = time.monotonic() + 30
        while not _blocked_on(lock_path):
            assert time.monotonic() < deadline, "the create never waited for the state lock"
            time.sleep(0.01)
        # Still holding the lock dcmi-sim waits for: the other user's vir16 fills the chip.
        state = sim.state()
        assert "serial 1\n" in state
        state = state.replace("serial 1\n", "serial 2\n").replace(
            "end\n", "vnpu 0 101 vir16 0xffff0000 2\nend\n"
        )
        (sim.path / "state").write_text(state)
        fcntl.flock(lock, fcntl.LOCK_UN)
    thread.join(30)
    assert len(outcome) == 1
    error = outcome[0]
    assert isinstance(error, InsufficientResourcesError)
    assert str(error).startswith(
        "NPU 0 (card 0, device 0) creating vir16: dcmi_create_vdevice failed with -8001 "
        "(DCMI_ERR_CODE_INVALID_PARAMETER): the chip has no room"
    )
    assert node910.counter() == 2  # the refused call was made
    assert [v.gpu_instance_id for v in backend.vnpus(0)] == [100, 101]


def test_a_refused_dcmi_init_is_a_hardware_error(
    make_npu_node: MakeNpuNode, tmp_path: Path
) -> None:
    make_npu_node(topology("910A", 1))  # restores DCMI_SIM_DIR afterwards
    backend = AscendBackend(str(LIBRARY), str(tmp_path))  # a directory without a topology
    with pytest.raises(HardwareError) as caught:
        backend.open()
    assert str(caught.value) == (
        f"DCMI ({LIBRARY}): dcmi_init failed with -8005 (DCMI_ERR_CODE_INNER_ERR): is the "
        "Ascend driver loaded (or dcmi.sim_dir a dcmi-sim directory)?"
    )
    with pytest.raises(HardwareError, match=r"^the Ascend backend is not open"):
        backend.inventory()


def test_a_library_that_cannot_be_loaded_is_a_hardware_error(tmp_path: Path) -> None:
    missing = tmp_path / "libdcmi.so"
    with pytest.raises(HardwareError, match=f"^cannot load DCMI library {missing}: "):
        AscendBackend(str(missing)).open()
    with pytest.raises(HardwareError, match="does not export dcmi_get_pcie_info"):
        DcmiLibrary(str(LIBRARY)).call("dcmi_get_pcie_info")


@pytest.fixture(scope="module")
def library_without_extension(
    dcmi_library: object, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """dcmi-sim linked without its dcmisim_* symbols: what Huawei's library exports."""
    directory = tmp_path_factory.mktemp("nosim")
    (directory / "exports").write_text("{ global: dcmi_*; local: *; };\n")
    objects = sorted(str(path) for path in (SIM_SOURCE / "build").glob("*.o"))
    output = directory / "libdcmi.so"
    subprocess.run(
        ["cc", "-shared", "-pthread", "-o", str(output), *objects,
         f"-Wl,--version-script={directory / 'exports'}"],
        check=True,
    )  # fmt: skip
    return output


def test_without_the_simulator_extension_units_are_unknown(
    node910: NpuNode, library_without_extension: Path
) -> None:
    node910.backend.create_vnpu(0, "vir08")
    backend = AscendBackend(str(library_without_extension), str(node910.sim.path))
    backend.open()
    try:
        assert not DcmiLibrary(str(library_without_extension)).has("dcmisim_get_vdevice_units")
        vnpu = backend.create_vnpu(0, "vir04")
        assert vnpu.gpu_instance_id == 101
        assert vnpu.units == ()
        assert (vnpu.placement_start, vnpu.placement_size) == (0, 4)
        assert [v.units for v in backend.vnpus(0)] == [(), ()]
    finally:
        backend.close()
        node910.activate()
    assert len(node910.backend.vnpus(0)[1].units) == 4


SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from agent.hw.ascend.backend import AscendBackend
backend = AscendBackend({library!r}, {sim_dir!r})
backend.open()
{call}
print("done")
"""


def run_backend(node: NpuNode, call: str, failpoint: str) -> subprocess.CompletedProcess[str]:
    script = SCRIPT.format(
        repo=str(REPO), library=str(LIBRARY), sim_dir=str(node.sim.path), call=call
    )
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env={**os.environ, ENVIRONMENT_VARIABLE: failpoint},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_crash_at_the_failpoint_before_create_leaves_the_chip_unchanged(
    node910: NpuNode,
) -> None:
    crashed = run_backend(
        node910, "backend.create_vnpu(2, 'vir08')", CrashPoint.LAYOUT_BEFORE_CREATE
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert (node910.counter(), vnpu_ids(node910.sim.lib, 2)) == (0, [])
    finished = run_backend(
        node910, "backend.create_vnpu(2, 'vir08')", CrashPoint.LAYOUT_BEFORE_DESTROY
    )
    assert (finished.returncode, finished.stdout) == (0, "done\n"), finished.stderr
    assert (node910.counter(), vnpu_ids(node910.sim.lib, 2)) == (1, [132])


def test_a_crash_at_the_failpoint_before_destroy_leaves_the_chip_unchanged(
    node910: NpuNode,
) -> None:
    assert create(node910.sim.lib, 2, b"vir08") == (dcmi.DCMI_OK, 132)
    crashed = run_backend(node910, "backend.destroy_vnpu(2, 132)", CrashPoint.LAYOUT_BEFORE_DESTROY)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert (node910.counter(), vnpu_ids(node910.sim.lib, 2)) == (1, [132])
    finished = run_backend(node910, "backend.destroy_vnpu(2, 132)", CrashPoint.LAYOUT_BEFORE_CREATE)
    assert finished.returncode == 0, finished.stderr
    assert (node910.counter(), vnpu_ids(node910.sim.lib, 2)) == (2, [])


def test_a_directory_without_a_topology_is_refused_in_a_fresh_process() -> None:
    # dcmi-sim prints its reason on stderr; the backend's error names dcmi_init and the code.
    directory = new_sim_dir()
    try:
        completed = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(SCRIPT.format(
                repo=str(REPO), library=str(LIBRARY), sim_dir=str(directory), call=""))],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        directory.rmdir()
    assert completed.returncode == 1
    assert completed.stderr.startswith("dcmi-sim: ")
    assert "HardwareError: DCMI (" in completed.stderr
    assert "dcmi_init failed with -8005" in completed.stderr
