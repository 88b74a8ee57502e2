"""Real uevents for the hotplug tests: devices on this machine whose uevent file we may write.

Writing an action to ``/sys/.../uevent`` makes the kernel emit a real uevent for that device
(Documentation/ABI/testing/sysfs-uevent). Since Linux 4.13 "ACTION UUID KEY=VALUE" tags it with
SYNTH_UUID and SYNTH_ARG_KEY (the key must be alphanumeric, else EINVAL), which is how a test
tells its own event from whatever else the machine emits meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.hw.hotplug import HotplugEvent, HotplugFilter, HotplugMonitor
from tests.support import machine_uevents

EVENT_WAIT_SECONDS = 10.0

_SYS = Path("/sys")
_WATCHED_SUBSYSTEMS = {"pci", "nvidia", "accel"}


@dataclass(frozen=True)
class Trigger:
    """One uevent a test caused, recognised by its tag (or its device, on kernels without tags)."""

    sys_path: str
    action: str
    tag: str | None

    def caused(self, event: HotplugEvent) -> bool:
        if self.tag is not None:
            return event.properties.get("SYNTH_UUID") == self.tag
        return event.sys_path == self.sys_path and self.action in event.actions


@dataclass(frozen=True)
class UeventDevice:
    """A device whose uevent file is writable."""

    sys_path: str
    subsystem: str
    pci_vendor_id: int | None = None
    pci_class_code: int | None = None

    def trigger(self, action: str = "change", tag: str | None = None) -> Trigger:
        """Makes the kernel emit ``action`` for this device; pass ``tag`` to reuse one."""
        tag = tag or str(uuid.uuid4())
        uevent = Path(self.sys_path) / "uevent"
        try:
            uevent.write_text(f"{action} {tag} ACCELGUARD=1")
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            # Kernels before 4.13 accept only the bare action.
            uevent.write_text(action)
            return Trigger(self.sys_path, action, None)
        return Trigger(self.sys_path, action, tag)

    def exact_filter(self) -> HotplugFilter:
        """Matches this PCI device's vendor and full class code, nothing else of the PCI bus."""
        assert self.pci_vendor_id is not None
        assert self.pci_class_code is not None
        return HotplugFilter(
            subsystems={"pci"},
            pci_vendor_ids={self.pci_vendor_id},
            pci_class_prefixes={f"{self.pci_class_code:06x}"},
        )


def _writable(device_dir: Path) -> bool:
    return os.access(device_dir / "uevent", os.W_OK)


def _pci_devices() -> list[UeventDevice]:
    devices = []
    for link in sorted((_SYS / "bus/pci/devices").glob("*")):
        if not _writable(link):
            continue
        try:
            vendor = int((link / "vendor").read_text().strip(), 16)
            class_code = int((link / "class").read_text().strip(), 16)
        except (OSError, ValueError):
            continue
        devices.append(UeventDevice(str(link.resolve()), "pci", vendor, class_code))
    return devices


@pytest.fixture(scope="session")
def pci_devices() -> list[UeventDevice]:
    devices = _pci_devices()
    if not devices:
        pytest.skip("no PCI device with a writable uevent file (not root, or no PCI bus)")
    return devices


@pytest.fixture(scope="session")
def pci_device(pci_devices: list[UeventDevice]) -> UeventDevice:
    return pci_devices[0]


@pytest.fixture(scope="session")
def other_pci_device(pci_devices: list[UeventDevice]) -> UeventDevice:
    """A PCI device that ``pci_device.exact_filter()`` does not match."""
    first = pci_devices[0]
    for device in pci_devices[1:]:
        if (device.pci_vendor_id, device.pci_class_code) != (
            first.pci_vendor_id,
            first.pci_class_code,
        ):
            return device
    pytest.skip("every writable PCI device has the same vendor and class: nothing to filter out")


@pytest.fixture(scope="session")
def unwatched_device() -> UeventDevice:
    """A device of a subsystem the hotplug monitor never watches (a CPU, if it can)."""
    buses = sorted(path.name for path in (_SYS / "bus").glob("*"))
    for bus in sorted(buses, key=lambda name: name != "cpu"):
        if bus in _WATCHED_SUBSYSTEMS:
            continue
        for link in sorted((_SYS / "bus" / bus / "devices").glob("*")):
            if _writable(link):
                return UeventDevice(str(link.resolve()), bus)
    pytest.skip("no writable uevent file outside the watched subsystems")


class EventRecorder:
    """An ``on_event`` that keeps every event and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[HotplugEvent] = []
        self._arrived = asyncio.Condition()

    async def __call__(self, event: HotplugEvent) -> None:
        async with self._arrived:
            self.events.append(event)
            self._arrived.notify_all()

    async def wait_for(self, trigger: Trigger) -> HotplugEvent:
        try:
            async with asyncio.timeout(EVENT_WAIT_SECONDS), self._arrived:
                await self._arrived.wait_for(lambda: self.first(trigger) is not None)
        except TimeoutError:
            pytest.fail(
                f"no hotplug event for {trigger} within {EVENT_WAIT_SECONDS} s;"
                f" received: {self.events}"
            )
        event = self.first(trigger)
        assert event is not None
        return event

    async def wait_for_event(self, predicate: Callable[[HotplugEvent], bool]) -> HotplugEvent:
        try:
            async with asyncio.timeout(EVENT_WAIT_SECONDS), self._arrived:
                await self._arrived.wait_for(lambda: any(map(predicate, self.events)))
        except TimeoutError:
            pytest.fail(f"no matching hotplug event within {EVENT_WAIT_SECONDS} s: {self.events}")
        return next(event for event in self.events if predicate(event))

    def first(self, trigger: Trigger) -> HotplugEvent | None:
        return next((event for event in self.events if trigger.caused(event)), None)

    def caused_by(self, trigger: Trigger) -> list[HotplugEvent]:
        return [event for event in self.events if trigger.caused(event)]


@contextlib.asynccontextmanager
async def running(monitor: HotplugMonitor) -> AsyncIterator[asyncio.Task[None]]:
    """Runs the monitor until the block ends; uevents emitted inside the block are seen."""
    task = asyncio.create_task(monitor.run())
    listening = asyncio.create_task(monitor.wait_listening())
    try:
        async with asyncio.timeout(EVENT_WAIT_SECONDS):
            await asyncio.wait({task, listening}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
            pytest.fail("HotplugMonitor.run() returned before it was listening")
        yield task
    finally:
        listening.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture(autouse=True)
def _machine_uevents() -> Iterator[None]:
    """No other worker's test emits uevents while one of these runs (see ``machine_uevents``)."""
    with machine_uevents():
        yield


@pytest.fixture
def recorder() -> EventRecorder:
    return EventRecorder()


@pytest.fixture(name="running")
def running_fixture() -> Callable[[HotplugMonitor], contextlib.AbstractAsyncContextManager[object]]:
    return running
