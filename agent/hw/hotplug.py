"""Accelerator hotplug: kernel uevents for GPUs and NPUs appearing, changing or disappearing.

``HotplugMonitor.run()`` listens on a udev netlink socket integrated with the asyncio loop (no
threads), keeps the events that concern accelerators (``HotplugFilter``), coalesces bursts per
device and hands each result to the consumer's ``on_event`` coroutine.

Event source: when udevd runs, its socket (``/run/udev/control``) exists and we take the "udev"
source, whose events arrive after udev rules have run, so device nodes named in an event already
exist with their final permissions. Without udevd (containers, minimal images, CI) nothing is ever
published on the udev multicast group, so we listen to the kernel's group directly.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import structlog

from agent.errors import ConfigError, HardwareError

UeventSource = Literal["udev", "kernel"]

UDEV_CONTROL_SOCKET = Path("/run/udev/control")

NVIDIA_PCI_VENDOR_ID = 0x10DE

# Delivered with an empty sys_path when uevents were lost: the kernel dropped some because our
# socket's receive buffer overflowed (ENOBUFS), or one could not be decoded. Some add or remove
# may be missing, so re-read the inventory.
EVENTS_LOST = "events-lost"

DEFAULT_COALESCE_SECONDS = 0.2

# A PCI rescan or a driver reload on an 8-GPU node emits hundreds of uevents in a burst (every
# function and child device has its own), which can overflow the default rmem (~208 KiB).
DEFAULT_RECEIVE_BUFFER_BYTES = 16 * 1024 * 1024

# What a consumer needs to identify the device and act on it; the rest (MODALIAS, udev's
# database keys) is noise. SYNTH_UUID/SYNTH_ARG_* are set by "change <uuid> KEY=VALUE" written to
# a uevent file (Linux >= 4.13, Documentation/ABI/testing/sysfs-uevent): whoever triggered an
# event can recognise it.
_KEPT_PROPERTIES = frozenset(
    {
        "DEVNAME",
        "DEVTYPE",
        "DRIVER",
        "MAJOR",
        "MINOR",
        "PCI_CLASS",
        "PCI_ID",
        "PCI_SLOT_NAME",
        "PCI_SUBSYS_ID",
        "SEQNUM",
        "SYNTH_UUID",
    }
)
_KEPT_PROPERTY_PREFIX = "SYNTH_ARG_"

# pyudev maps libudev errnos to these (EINVAL -> ValueError, ENOMEM -> MemoryError,
# EOVERFLOW -> OverflowError); everything else is an OSError.
_PYUDEV_ERRORS = (OSError, ValueError, MemoryError, OverflowError)

_log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class HotplugEvent:
    """One device's uevents, coalesced: ``action`` is the latest, ``actions`` every action in
    order with immediate repeats collapsed ("change", "change" -> "change").

    ``actions`` keeps what coalescing would otherwise hide: "remove" then "add" within one window
    means the device went away (a reset or a driver rebind) even though it is back now.
    """

    action: str
    subsystem: str
    sys_path: str
    properties: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    actions: tuple[str, ...] = ()


def _is_class_prefix(prefix: object) -> bool:
    return (
        isinstance(prefix, str)
        and 1 <= len(prefix) <= 6
        and all(character in "0123456789abcdefABCDEF" for character in prefix)
    )


def _hex_number(text: str, *, max_digits: int) -> int | None:
    if not 1 <= len(text) <= max_digits:
        return None
    if not all(character in "0123456789abcdefABCDEF" for character in text):
        return None
    return int(text, 16)


def _pci_class_code(value: str | None) -> int | None:
    # drivers/pci/pci-driver.c pci_uevent(): "PCI_CLASS=%04X" of the 24-bit class, so the
    # leading zero of the base class is dropped ("30200" is 0x030200).
    if value is None:
        return None
    return _hex_number(value, max_digits=6)


def _pci_vendor_id(value: str | None) -> int | None:
    # pci_uevent(): "PCI_ID=%04X:%04X" of vendor and device.
    if value is None:
        return None
    vendor, separator, _device = value.partition(":")
    if not separator:
        return None
    return _hex_number(vendor, max_digits=4)


@dataclass(frozen=True)
class HotplugFilter:
    """Which uevents concern accelerators.

    PCI criteria apply only to events of the "pci" subsystem; ``None`` means "any". Class
    prefixes are hex digits of the 24-bit PCI class code written as six digits: "03" is every
    display controller, "0302" a 3D controller (data-centre GPUs), "030000" a VGA controller.

    The "drm" subsystem is left out by default: every connector hotplug on a display GPU emits a
    drm "change", and a GPU's arrival is already announced by its PCI device.
    """

    subsystems: AbstractSet[str] = frozenset({"pci", "nvidia", "accel"})
    pci_vendor_ids: AbstractSet[int] | None = frozenset({NVIDIA_PCI_VENDOR_ID})
    pci_class_prefixes: AbstractSet[str] | None = frozenset({"03"})

    def __post_init__(self) -> None:
        subsystems = frozenset(self.subsystems)
        if not subsystems or not all(isinstance(name, str) and name for name in subsystems):
            raise ConfigError(
                f"hotplug filter: subsystems must be non-empty names, got {sorted(subsystems)!r}"
            )
        object.__setattr__(self, "subsystems", subsystems)
        if self.pci_vendor_ids is not None:
            vendor_ids = frozenset(self.pci_vendor_ids)
            for vendor_id in vendor_ids:
                if not isinstance(vendor_id, int) or not 0 <= vendor_id <= 0xFFFF:
                    raise ConfigError(
                        f"hotplug filter: PCI vendor id {vendor_id!r} is not a 16-bit number"
                    )
            object.__setattr__(self, "pci_vendor_ids", vendor_ids)
        if self.pci_class_prefixes is not None:
            prefixes = frozenset(self.pci_class_prefixes)
            for prefix in prefixes:
                if not _is_class_prefix(prefix):
                    raise ConfigError(
                        f"hotplug filter: PCI class prefix {prefix!r} must be 1 to 6 hex digits"
                        " of the class code written as six digits (e.g. '03' or '0302')"
                    )
            object.__setattr__(self, "pci_class_prefixes", frozenset(p.lower() for p in prefixes))

    def matches(self, subsystem: str, properties: Mapping[str, str]) -> bool:
        """Whether a uevent of ``subsystem`` with these properties concerns us.

        A PCI property that is missing or unreadable does not exclude the event: a spurious event
        costs the consumer one re-inventory, a dropped "remove" leaves a stale partition.
        """
        if subsystem not in self.subsystems:
            return False
        if subsystem != "pci":
            return True
        if self.pci_vendor_ids is not None:
            vendor_id = _pci_vendor_id(properties.get("PCI_ID"))
            if vendor_id is not None and vendor_id not in self.pci_vendor_ids:
                return False
        if self.pci_class_prefixes is not None:
            class_code = _pci_class_code(properties.get("PCI_CLASS"))
            if class_code is not None:
                digits = f"{class_code:06x}"
                if not any(digits.startswith(prefix) for prefix in self.pci_class_prefixes):
                    return False
        return True


DEFAULT_FILTER = HotplugFilter()


def select_uevent_source(udev_control: Path = UDEV_CONTROL_SOCKET) -> UeventSource:
    """The "udev" source when udevd runs (its control socket exists), else "kernel"."""
    try:
        udevd_runs = udev_control.exists()
    except OSError:
        # Unable to tell: the kernel source works with or without udevd.
        udevd_runs = False
    return "udev" if udevd_runs else "kernel"


class _Coalescer:
    """Events waiting for their device's window to close, keyed by sys_path."""

    def __init__(self, window_seconds: float) -> None:
        self._window_seconds = window_seconds
        self._pending: dict[str, tuple[HotplugEvent, float]] = {}

    def add(self, event: HotplugEvent, now: float) -> None:
        waiting = self._pending.get(event.sys_path)
        if waiting is None:
            # The window opens with the first event and is not extended by later ones, so a
            # device that never stops emitting still gets reported.
            self._pending[event.sys_path] = (event, now + self._window_seconds)
            return
        earlier, deadline = waiting
        actions = earlier.actions
        if actions[-1] != event.action:
            actions = (*actions, event.action)
        merged = HotplugEvent(
            action=event.action,
            subsystem=event.subsystem,
            sys_path=event.sys_path,
            properties=event.properties,
            actions=actions,
        )
        self._pending[event.sys_path] = (merged, deadline)

    def take_due(self, now: float) -> list[HotplugEvent]:
        due = [key for key, (_event, deadline) in self._pending.items() if deadline <= now]
        return [self._pending.pop(key)[0] for key in due]

    def next_deadline(self) -> float | None:
        return min((deadline for _event, deadline in self._pending.values()), default=None)


class _UeventSocket:
    """The pyudev monitor of one ``run()``; every libudev error leaves here as HardwareError.

    pyudev has no close(): the netlink socket is closed by udev_monitor_unref() in the Monitor's
    __del__, which CPython runs as soon as the last reference goes. A traceback through pyudev
    holds one (the method's ``self``), so pyudev errors are chained without their traceback and
    no frame we raise from keeps the monitor in a local.
    """

    def __init__(self, source: UeventSource, subsystems: AbstractSet[str]) -> None:
        monitor: Any = None
        try:
            # Imported here so that a node without libudev.so.1 fails with a HardwareError when
            # the monitor starts, not with an ImportError when the daemon imports hw/.
            import pyudev  # noqa: PLC0415

            context = pyudev.Context()
            monitor = pyudev.Monitor.from_netlink(context, source=source)
            for subsystem in sorted(subsystems):
                monitor.filter_by(subsystem)
            monitor.start()
            fd: int = monitor.fileno()
            # Our own handle on the netlink socket, only to read SO_ERROR: pyudev's poll() raises
            # on POLLERR without reading the pending error, so after an overflow (ENOBUFS) every
            # later poll would fail the same way.
            error_reader = socket.fromfd(fd, socket.AF_NETLINK, socket.SOCK_RAW)
        except ImportError as error:
            raise HardwareError(
                f"cannot watch accelerator hotplug: pyudev could not load libudev ({error});"
                " install libudev1"
            ) from None
        except _PYUDEV_ERRORS as error:
            monitor = None
            raise HardwareError(
                f"cannot watch accelerator hotplug: opening the {source} uevent netlink socket"
                f" failed ({_describe(error)}); check RLIMIT_NOFILE and that the daemon may open"
                " NETLINK_KOBJECT_UEVENT sockets"
            ) from error.with_traceback(None)
        self.fd = fd
        self._monitor: Any = monitor
        self._error_reader = error_reader

    def set_receive_buffer(self, size: int) -> None:
        try:
            self._monitor.set_receive_buffer_size(size)
        except _PYUDEV_ERRORS as error:
            # SO_RCVBUFFORCE needs CAP_NET_ADMIN, which a hardened unit may not grant; the
            # default buffer works, it just overflows sooner (and we report that).
            _log.warning("hotplug.receive_buffer_unchanged", requested=size, error=_describe(error))

    def receive(self) -> tuple[list[Any], bool]:
        """Every device queued on the socket now, and whether the kernel dropped some."""
        devices: list[Any] = []
        events_lost = self._take_overflow()
        while True:
            try:
                device = self._monitor.poll(timeout=0)
            except _PYUDEV_ERRORS as error:
                # ENOBUFS comes from recvmsg() when the overflow happened after our SO_ERROR
                # read; pyudev's own poll() reports it as a bare "Error while polling fd".
                if getattr(error, "errno", None) == errno.ENOBUFS or self._take_overflow():
                    events_lost = True
                    continue
                raise HardwareError(
                    f"accelerator hotplug: receiving a uevent failed ({_describe(error)})"
                ) from error.with_traceback(None)
            if device is None:
                return devices, events_lost
            devices.append(device)

    def _take_overflow(self) -> bool:
        """Reads (and so clears) the socket's pending error: True for ENOBUFS."""
        try:
            pending = self._error_reader.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as error:
            raise HardwareError(
                f"accelerator hotplug: reading the uevent socket's error failed ({error})"
            ) from error
        if pending == errno.ENOBUFS:
            return True
        if pending:
            raise HardwareError(
                f"accelerator hotplug: the uevent socket failed: {os.strerror(pending)}"
                f" (errno {pending})"
            )
        return False

    def close(self) -> None:
        self._error_reader.close()
        self._monitor = None


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _event_from_device(device: Any) -> HotplugEvent:
    action = str(device.action or "")
    properties = {
        key: str(value)
        for key, value in device.properties.items()
        if key in _KEPT_PROPERTIES or key.startswith(_KEPT_PROPERTY_PREFIX)
    }
    return HotplugEvent(
        action=action,
        subsystem=str(device.subsystem or ""),
        sys_path=str(device.sys_path),
        properties=MappingProxyType(properties),
        actions=(action,),
    )


def _events_lost_event() -> HotplugEvent:
    return HotplugEvent(action=EVENTS_LOST, subsystem="", sys_path="", actions=(EVENTS_LOST,))


class HotplugMonitor:
    """Watches accelerator uevents and awaits ``on_event`` once per device per burst.

    ``coalesce_seconds`` is how long after a device's first event its later events are merged
    into the same call; events read from the socket together are always merged. ``source`` None
    picks the udev source when udevd runs, else the kernel source.
    """

    def __init__(
        self,
        on_event: Callable[[HotplugEvent], Awaitable[None]],
        filter: HotplugFilter = DEFAULT_FILTER,
        *,
        coalesce_seconds: float = DEFAULT_COALESCE_SECONDS,
        source: UeventSource | None = None,
        receive_buffer_bytes: int | None = DEFAULT_RECEIVE_BUFFER_BYTES,
    ) -> None:
        if coalesce_seconds < 0:
            raise ConfigError(f"hotplug: coalesce_seconds must be >= 0, got {coalesce_seconds}")
        if receive_buffer_bytes is not None and receive_buffer_bytes <= 0:
            raise ConfigError(
                f"hotplug: receive_buffer_bytes must be positive, got {receive_buffer_bytes}"
            )
        self._on_event = on_event
        self._filter = filter
        self._coalesce_seconds = coalesce_seconds
        self._source = source
        self._receive_buffer_bytes = receive_buffer_bytes
        self._listening = asyncio.Event()

    async def wait_listening(self) -> None:
        """Returns once ``run()`` is subscribed: uevents emitted from now on are seen."""
        await self._listening.wait()

    async def run(self) -> None:
        """Deliver events until cancelled; raises HardwareError if the uevent socket fails."""
        loop = asyncio.get_running_loop()
        source = self._source or select_uevent_source()
        uevents = _UeventSocket(source, self._filter.subsystems)
        coalescer = _Coalescer(self._coalesce_seconds)
        wakeup = asyncio.Event()
        failures: list[HardwareError] = []
        fd = uevents.fd

        def on_readable() -> None:
            try:
                devices, events_lost = uevents.receive()
            except HardwareError as error:
                failures.append(error)
                loop.remove_reader(fd)
                wakeup.set()
                return
            events = []
            for device in devices:
                try:
                    events.append(_event_from_device(device))
                except ValueError:
                    # pyudev decodes names and values strictly as UTF-8 (UnicodeDecodeError);
                    # whatever the device was, the consumer must not miss it.
                    events_lost = True
            now = loop.time()
            if events_lost:
                _log.warning("hotplug.events_lost", source=source)
                coalescer.add(_events_lost_event(), now)
            for event in events:
                if self._filter.matches(event.subsystem, event.properties):
                    coalescer.add(event, now)
            wakeup.set()

        try:
            if self._receive_buffer_bytes is not None:
                uevents.set_receive_buffer(self._receive_buffer_bytes)
            loop.add_reader(fd, on_readable)
            self._listening.set()
            while True:
                if failures:
                    raise failures[0]
                due = coalescer.take_due(loop.time())
                for event in due:
                    await self._on_event(event)
                if due:
                    continue
                deadline = coalescer.next_deadline()
                wakeup.clear()
                try:
                    async with asyncio.timeout_at(deadline):
                        await wakeup.wait()
                except TimeoutError:
                    pass
        finally:
            self._listening.clear()
            loop.remove_reader(fd)
            uevents.close()
