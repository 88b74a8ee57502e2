"""XID events injected through DIR/xid and read with nvmlEventSetWait."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pynvml
import pytest

from tests.nvmlsim.simdir import SimDir

XID = pynvml.nvmlEventTypeXidCriticalError
NO_INSTANCE = 0xFFFFFFFF


@pytest.fixture
def event_set(sim: SimDir) -> Iterator[Any]:
    created = pynvml.nvmlEventSetCreate()
    try:
        yield created
    finally:
        pynvml.nvmlEventSetFree(created)


def drain(event_set: Any) -> list[tuple[int, int, int, int, int]]:
    """(gpu index, event type, xid, GI id, CI id) of every event ready now."""
    events: list[tuple[int, int, int, int, int]] = []
    while True:
        try:
            data = pynvml.nvmlEventSetWait_v2(event_set, 0)
        except pynvml.NVMLError_Timeout:
            return events
        events.append(
            (
                pynvml.nvmlDeviceGetIndex(data.device),
                data.eventType,
                data.eventData,
                data.gpuInstanceId,
                data.computeInstanceId,
            )
        )


def test_supported_event_types_include_xid(sim: SimDir) -> None:
    supported = pynvml.nvmlDeviceGetSupportedEventTypes(pynvml.nvmlDeviceGetHandleByIndex(0))
    assert supported & XID


def test_xids_appended_after_registration_arrive_in_order(sim: SimDir, event_set: Any) -> None:
    sim.append_xid("0 48")  # before registration: never delivered
    pynvml.nvmlDeviceRegisterEvents(pynvml.nvmlDeviceGetHandleByIndex(0), XID, event_set)
    pynvml.nvmlDeviceRegisterEvents(pynvml.nvmlDeviceGetHandleByIndex(1), XID, event_set)
    sim.append_xid("0 79")
    sim.append_xid("2 31")  # GPU 2 is not registered
    sim.append_xid("1 94 3 0")
    sim.append_xid("not an xid line")
    sim.append_xid("0 63 -1 -1")
    assert drain(event_set) == [
        (0, XID, 79, NO_INSTANCE, NO_INSTANCE),
        (1, XID, 94, 3, 0),
        (0, XID, 63, NO_INSTANCE, NO_INSTANCE),
    ]
    with pytest.raises(pynvml.NVMLError_Timeout):
        pynvml.nvmlEventSetWait_v2(event_set, 20)


def test_each_event_set_gets_its_own_copy(sim: SimDir, event_set: Any) -> None:
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    pynvml.nvmlDeviceRegisterEvents(handle, XID, event_set)
    other = pynvml.nvmlEventSetCreate()
    try:
        pynvml.nvmlDeviceRegisterEvents(handle, XID, other)
        sim.append_xid("0 13")
        assert drain(event_set) == [(0, XID, 13, NO_INSTANCE, NO_INSTANCE)]
        assert drain(other) == [(0, XID, 13, NO_INSTANCE, NO_INSTANCE)]
    finally:
        pynvml.nvmlEventSetFree(other)


def test_wait_blocks_until_an_xid_is_appended(sim: SimDir, event_set: Any) -> None:
    pynvml.nvmlDeviceRegisterEvents(pynvml.nvmlDeviceGetHandleByIndex(2), XID, event_set)
    writer = threading.Timer(0.05, sim.append_xid, args=("2 119",))
    writer.start()
    try:
        data = pynvml.nvmlEventSetWait_v2(event_set, 10_000)
    finally:
        writer.join()
    assert (data.eventType, data.eventData) == (XID, 119)
    # The legacy wait returns the same events without the instance ids.
    sim.append_xid("2 120")
    legacy = pynvml.c_nvmlEventData_t()
    assert pynvml.nvmlLib.nvmlEventSetWait(event_set, pynvml.byref(legacy), 1000) == 0
    assert legacy.eventData == 120


def test_registration_errors(sim: SimDir, event_set: Any) -> None:
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceRegisterEvents(handle, 1 << 40, event_set)
    freed = pynvml.nvmlEventSetCreate()
    pynvml.nvmlEventSetFree(freed)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceRegisterEvents(handle, XID, freed)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlEventSetWait_v2(freed, 0)


def test_a_truncated_xid_file_starts_over(sim: SimDir, event_set: Any) -> None:
    pynvml.nvmlDeviceRegisterEvents(pynvml.nvmlDeviceGetHandleByIndex(0), XID, event_set)
    sim.append_xid("0 31")
    assert [event[2] for event in drain(event_set)] == [31]
    (sim.path / "xid").write_text("0 43\n")
    assert [event[2] for event in drain(event_set)] == [43]


def test_a_partial_line_waits_for_its_newline(sim: SimDir, event_set: Any) -> None:
    pynvml.nvmlDeviceRegisterEvents(pynvml.nvmlDeviceGetHandleByIndex(0), XID, event_set)
    with (sim.path / "xid").open("a") as xid:
        xid.write("0 7")
    assert drain(event_set) == []
    with (sim.path / "xid").open("a") as xid:
        xid.write("9\n")
    assert [event[2] for event in drain(event_set)] == [79]
