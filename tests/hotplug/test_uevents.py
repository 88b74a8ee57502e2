"""HotplugMonitor against real kernel uevents, triggered through sysfs uevent files."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from agent.errors import HardwareError
from agent.hw.hotplug import EVENTS_LOST, HotplugEvent, HotplugMonitor

if TYPE_CHECKING:
    from tests.hotplug.conftest import EventRecorder, UeventDevice

Running = Callable[[HotplugMonitor], contextlib.AbstractAsyncContextManager[object]]


def _open_fds() -> dict[int, str]:
    fds = {}
    for link in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # the directory's own fd is gone once listed
            fds[int(link.name)] = str(link.readlink())
    return fds


def test_change_on_a_real_device_is_delivered(
    pci_device: UeventDevice, recorder: EventRecorder, running: Running
) -> None:
    async def scenario() -> HotplugEvent:
        monitor = HotplugMonitor(recorder, pci_device.exact_filter())
        async with running(monitor):
            trigger = pci_device.trigger("change")
            return await recorder.wait_for(trigger)

    event = asyncio.run(scenario())

    assert event.action == "change"
    assert event.actions == ("change",)
    assert event.subsystem == "pci"
    assert event.sys_path == pci_device.sys_path
    assert event.properties["PCI_SLOT_NAME"] == Path(pci_device.sys_path).name
    assert int(event.properties["PCI_CLASS"], 16) == pci_device.pci_class_code
    assert "MODALIAS" not in event.properties


def test_other_pci_devices_are_filtered_out(
    pci_device: UeventDevice,
    other_pci_device: UeventDevice,
    recorder: EventRecorder,
    running: Running,
) -> None:
    async def scenario() -> None:
        monitor = HotplugMonitor(recorder, pci_device.exact_filter(), coalesce_seconds=0)
        async with running(monitor):
            filtered = other_pci_device.trigger("change")
            # The kernel queues uevents in order on our socket: once the later one is delivered,
            # the earlier one has been read and judged.
            await recorder.wait_for(pci_device.trigger("change"))
            assert recorder.caused_by(filtered) == []
            assert all(event.sys_path == pci_device.sys_path for event in recorder.events)

    asyncio.run(scenario())


def test_unwatched_subsystems_are_filtered_out(
    pci_device: UeventDevice,
    unwatched_device: UeventDevice,
    recorder: EventRecorder,
    running: Running,
) -> None:
    async def scenario() -> None:
        monitor = HotplugMonitor(recorder, pci_device.exact_filter(), coalesce_seconds=0)
        async with running(monitor):
            filtered = unwatched_device.trigger("change")
            await recorder.wait_for(pci_device.trigger("change"))
            assert recorder.caused_by(filtered) == []
            assert {event.subsystem for event in recorder.events} == {"pci"}

    asyncio.run(scenario())


def test_burst_for_one_device_is_one_call(
    pci_device: UeventDevice, recorder: EventRecorder, running: Running
) -> None:
    async def scenario() -> None:
        monitor = HotplugMonitor(recorder, pci_device.exact_filter())
        async with running(monitor):
            # No await between the writes: the kernel has queued all three before the loop reads
            # any, so they are coalesced whatever the window and however slow the machine.
            burst = pci_device.trigger("add")
            pci_device.trigger("change", tag=burst.tag)
            pci_device.trigger("change", tag=burst.tag)
            event = await recorder.wait_for(burst)
            await recorder.wait_for(pci_device.trigger("change"))

            assert event.actions[-2:] == ("add", "change")
            assert event.action == "change"
            if burst.tag is not None:
                assert recorder.caused_by(burst) == [event]

    asyncio.run(scenario())


def test_socket_overflow_is_reported_and_monitoring_goes_on(
    pci_device: UeventDevice, recorder: EventRecorder, running: Running
) -> None:
    async def scenario() -> None:
        # The kernel clamps the buffer to its minimum (about two uevents).
        monitor = HotplugMonitor(recorder, pci_device.exact_filter(), receive_buffer_bytes=1)
        async with running(monitor):
            for _ in range(200):  # no await: the loop cannot drain the socket meanwhile
                pci_device.trigger("change")
            await recorder.wait_for_event(lambda event: event.action == EVENTS_LOST)
            after = await recorder.wait_for(pci_device.trigger("change"))
            assert after.action == "change"

    asyncio.run(scenario())
    lost = [event for event in recorder.events if event.action == EVENTS_LOST]
    assert lost[0].sys_path == ""


async def _fail(_event: HotplugEvent) -> None:
    raise LookupError("consumer failed")


@pytest.mark.parametrize("ending", ["cancelled", "consumer raised"])
def test_run_ends_without_leaking_the_socket(
    pci_device: UeventDevice, recorder: EventRecorder, ending: str
) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        before = _open_fds()
        on_event = recorder if ending == "cancelled" else _fail
        monitor = HotplugMonitor(on_event, pci_device.exact_filter(), coalesce_seconds=0)
        task = asyncio.create_task(monitor.run())
        async with asyncio.timeout(10):
            await monitor.wait_listening()
        during = _open_fds()
        netlink = [fd for fd, target in during.items() if fd not in before and "socket" in target]
        assert netlink, f"no new socket while listening: {during}"

        if ending == "cancelled":
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            pci_device.trigger("change")
            with pytest.raises(LookupError):
                async with asyncio.timeout(10):
                    await task

        assert _open_fds() == before
        for fd in netlink:
            assert not loop.remove_reader(fd), f"reader for fd {fd} left on the loop"

    asyncio.run(scenario())


def test_monitor_can_run_again_after_cancellation(
    pci_device: UeventDevice, recorder: EventRecorder, running: Running
) -> None:
    async def scenario() -> None:
        monitor = HotplugMonitor(recorder, pci_device.exact_filter())
        async with running(monitor):
            await recorder.wait_for(pci_device.trigger("change"))
        async with running(monitor):
            await recorder.wait_for(pci_device.trigger("change"))

    asyncio.run(scenario())


def test_no_free_file_descriptor_is_a_hardware_error() -> None:
    async def scenario() -> None:
        monitor = HotplugMonitor(_fail)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        probe = os.dup(0)
        os.close(probe)
        # `probe` is the lowest free descriptor: with the limit there, socket() gets EMFILE.
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
        try:
            with pytest.raises(HardwareError, match="uevent netlink socket") as raised:
                await monitor.run()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert "RLIMIT_NOFILE" in str(raised.value)

    asyncio.run(scenario())
