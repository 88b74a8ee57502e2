"""State shared between processes through DIR/state, and crash safety of its updates."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import threading
import time
from typing import Any

import pynvml

from tests.nvmlsim.simdir import SimDir

LIST_INSTANCES = """
handle = pynvml.nvmlDeviceGetHandleByIndex(0)
result = []
for profile_id in (19, 20, 15, 14, 9, 5, 0):
    array = (pynvml.c_nvmlGpuInstance_t * 8)()
    count = ctypes.c_uint(0)
    pynvml.nvmlDeviceGetGpuInstances(handle, profile_id, array, ctypes.byref(count))
    for i in range(count.value):
        info = pynvml.nvmlGpuInstanceGetInfo(array[i])
        result.append([info.id, info.profileId, info.placement.start])
result.sort()
"""


def test_another_process_sees_instances_this_one_created(sim: SimDir) -> None:
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    gi = pynvml.nvmlDeviceCreateGpuInstance(handle, 9)
    pynvml.nvmlGpuInstanceCreateComputeInstance(gi, 2)
    pynvml.nvmlDeviceCreateGpuInstance(handle, 19)
    assert sim.run_python(LIST_INSTANCES) == [[1, 9, 0], [11, 19, 4]]
    mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, 0)
    uuid = pynvml.nvmlDeviceGetUUID(mig)
    seen = sim.run_python(
        "result = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetMigDeviceHandleByIndex("
        "pynvml.nvmlDeviceGetHandleByIndex(0), 0))"
    )
    assert seen == uuid


def test_this_process_sees_another_ones_changes_without_reinit(sim: SimDir) -> None:
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    kept = pynvml.nvmlDeviceCreateGpuInstance(handle, 19)
    sim.run_python(
        """
handle = pynvml.nvmlDeviceGetHandleByIndex(0)
pynvml.nvmlGpuInstanceDestroy(pynvml.nvmlDeviceGetGpuInstanceById(handle, 7))
gi = pynvml.nvmlDeviceCreateGpuInstance(handle, 14)
pynvml.nvmlGpuInstanceCreateComputeInstance(gi, 1)
pynvml.nvmlDeviceSetMigMode(pynvml.nvmlDeviceGetHandleByIndex(1), 0)
"""
    )
    assert pynvml.nvmlDeviceGetMigMode(pynvml.nvmlDeviceGetHandleByIndex(1)) == [1, 0]
    gi = pynvml.nvmlDeviceGetGpuInstanceById(handle, 3)
    assert pynvml.nvmlGpuInstanceGetInfo(gi).profileId == 14
    # Our handle to GI 7 went stale when the other process destroyed it.
    try:
        pynvml.nvmlGpuInstanceGetInfo(kept)
    except pynvml.NVMLError_InvalidArgument:
        pass
    else:
        raise AssertionError("a handle to a destroyed GPU instance still resolved")


def test_a_restarted_process_continues_where_the_last_one_stopped(sim: SimDir) -> None:
    first = sim.run_python(
        """
gi = pynvml.nvmlDeviceCreateGpuInstance(pynvml.nvmlDeviceGetHandleByIndex(0), 5)
pynvml.nvmlGpuInstanceCreateComputeInstance(gi, 3)
result = pynvml.nvmlDeviceGetUUID(
    pynvml.nvmlDeviceGetMigDeviceHandleByIndex(pynvml.nvmlDeviceGetHandleByIndex(0), 0))
"""
    )
    second = sim.run_python(
        "result = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetMigDeviceHandleByIndex("
        "pynvml.nvmlDeviceGetHandleByIndex(0), 0))"
    )
    assert first == second
    assert sim.run_python(LIST_INSTANCES) == [[1, 5, 0]]


def churn_forever(seed: int) -> None:
    """Create and destroy instances on GPU 0 until killed (runs in a forked child)."""
    chooser = random.Random(seed)
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    while True:
        gi = pynvml.nvmlDeviceCreateGpuInstance(handle, chooser.choice((19, 15, 14, 9)))
        ci = pynvml.nvmlGpuInstanceCreateComputeInstance(gi, 0)
        pynvml.nvmlComputeInstanceDestroy(ci)
        pynvml.nvmlGpuInstanceDestroy(gi)


def list_instances(handle: Any) -> list[tuple[int, Any]]:
    found = []
    for profile_id in (19, 20, 15, 14, 9, 5, 0):
        array = (pynvml.c_nvmlGpuInstance_t * 8)()
        count = ctypes.c_uint(0)
        pynvml.nvmlDeviceGetGpuInstances(handle, profile_id, array, ctypes.byref(count))
        found += [
            (pynvml.nvmlGpuInstanceGetInfo(array[i]).id, array[i]) for i in range(count.value)
        ]
    return found


def test_sigkill_during_updates_never_leaves_an_unreadable_state(sim: SimDir) -> None:
    # The churn runs on GPU 0 while this process holds a GPU instance on GPU 1, which must
    # survive every kill untouched.
    pynvml.nvmlDeviceCreateGpuInstance(pynvml.nvmlDeviceGetHandleByIndex(1), 0)
    chooser = random.Random(1234)
    for round_number in range(30):
        started = sim.counter()
        pid = os.fork()
        if pid == 0:  # the child: NVML is already initialised, inherited from this process
            try:
                churn_forever(round_number)
            finally:
                os._exit(1)
        try:
            # Kill it at a different point of its write cycle each round.
            target = started + chooser.randrange(3, 40)
            while sim.counter() < target:
                assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the churning child died by itself"
                time.sleep(0.0005)
            time.sleep(chooser.random() * 0.002)
        finally:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        state = (sim.path / "state").read_text()
        assert state.startswith("nvml-sim-state 1\n"), round_number
        assert state.endswith("end\n"), round_number
        assert int((sim.path / "counters").read_text().split()[1]) >= target
        # Loading it again from disk works, and the flock died with the child: we can go on
        # changing the state.
        pynvml.nvmlShutdown()
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        leftovers = list_instances(handle)
        assert len(leftovers) <= 1, round_number
        for _, gi in leftovers:
            array = (pynvml.c_nvmlComputeInstance_t * 8)()
            count = ctypes.c_uint(0)
            pynvml.nvmlGpuInstanceGetComputeInstances(gi, 0, array, ctypes.byref(count))
            for i in range(count.value):
                pynvml.nvmlComputeInstanceDestroy(array[i])
            pynvml.nvmlGpuInstanceDestroy(gi)
    assert sim.run_python(LIST_INSTANCES) == []
    assert pynvml.nvmlDeviceGetGpuInstanceById(pynvml.nvmlDeviceGetHandleByIndex(1), 0)


def test_many_create_destroy_cycles_keep_state_consistent(sim: SimDir) -> None:
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    start = sim.counter()
    for round_number in range(300):
        gi = pynvml.nvmlDeviceCreateGpuInstance(handle, 19)
        ci = pynvml.nvmlGpuInstanceCreateComputeInstance(gi, 0)
        info: Any = pynvml.nvmlComputeInstanceGetInfo(ci)
        assert (info.id, info.placement.start) == (0, 0), round_number
        pynvml.nvmlComputeInstanceDestroy(ci)
        pynvml.nvmlGpuInstanceDestroy(gi)
    assert sim.counter() == start + 1200
    assert sim.run_python(LIST_INSTANCES) == []


def test_concurrent_processes_never_double_book_a_slice(sim: SimDir) -> None:
    # Each child grabs 1g instances until the GPU is full; the flock-protected read-modify-write
    # must hand out every placement exactly once.
    children = []
    for _ in range(3):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_end)
                handle = pynvml.nvmlDeviceGetHandleByIndex(0)
                created = 0
                while True:
                    try:
                        pynvml.nvmlDeviceCreateGpuInstance(handle, 19)
                    except pynvml.NVMLError_InsufficientResources:
                        break
                    created += 1
                os.write(write_end, str(created).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        children.append((pid, read_end))
    total = 0
    for pid, read_end in children:
        with os.fdopen(read_end) as pipe:
            total += int(pipe.read() or "0")
        os.waitpid(pid, 0)
    assert total == 7
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    assert sorted(gi_id for gi_id, _ in list_instances(handle)) == list(range(7, 14))


def test_threads_share_the_library_safely(sim: SimDir) -> None:
    errors: list[BaseException] = []

    def churn(gpu_index: int) -> None:
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(gpu_index)
            for _ in range(40):
                gi = pynvml.nvmlDeviceCreateGpuInstance(handle, 9)
                ci = pynvml.nvmlGpuInstanceCreateComputeInstance(gi, 0)
                pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, 0)
                pynvml.nvmlComputeInstanceDestroy(ci)
                pynvml.nvmlGpuInstanceDestroy(gi)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            errors.append(error)

    threads = [threading.Thread(target=churn, args=(index,)) for index in (0, 1, 0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert list_instances(pynvml.nvmlDeviceGetHandleByIndex(0)) == []
