"""Compute accelerators of the kernel's accel subsystem (``/dev/accel/accelN``), through sysfs.

The accel subsystem (drivers/accel, ``CONFIG_DRM_ACCEL``; Intel Gaudi/habanalabs, intel_vpu,
amdxdna, qaic, ...) gives every device one char node with the fixed major 261 (``ACCEL_MAJOR`` in
include/drm/drm_accel.h) and a minor equal to the N of ``accelN`` in /dev and in sysfs (kernel
commit 2c204f3, "accel: add dedicated minor for accelerator devices"). This backend needs no
vendor library: ``/sys/class/accel/accelN/dev`` holds ``261:N``, ``accelN/device`` links to the
parent (for these drivers a PCI function), and that parent's ``driver``, ``vendor`` and ``device``
say what it is.

Invariants:

- A device's identity is its PCI address (``ACCEL-<bdf>``): N is handed out in probe order and may
  change across reboots and rebinds, the PCI function does not. A device without a PCI parent
  falls back to ``ACCEL-accelN``.
- Every sysfs file is read with a size cap, without following a final symlink and without
  blocking, and parsed strictly: anything unexpected is a ``HardwareError`` that names the file,
  never another exception and never a guess. The inventory fails closed.
- ``nodes`` re-reads sysfs and stats the node: it answers only with a node whose device numbers
  are the ones sysfs gives the same device now. A fence built from a stale or forged node would
  guard the wrong device.
- ``reset`` only ever writes ``1`` to the function's own ``reset`` attribute; policy (when a reset
  is enough) belongs to the caller.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.errors import HardwareError
from agent.hw.devnodes import DeviceNode
from agent.hw.model import ACCEL, DeviceInfo

# include/drm/drm_accel.h: ACCEL_MAJOR 261, ACCEL_MAX_MINORS 256.
ACCEL_MAJOR = 261
ACCEL_MAX_MINORS = 256

# Hostile-input bounds. A sysfs attribute's show() fills at most one page (fs/sysfs/file.c), so
# anything longer is not the kernel talking.
MAX_ATTRIBUTE_BYTES = 4096
# Linux dev_t: 12-bit major, 20-bit minor (include/linux/kdev_t.h MINORBITS).
_MAX_MAJOR = (1 << 12) - 1
_MAX_MINOR = (1 << 20) - 1

_ACCEL_NAME = re.compile(r"accel(0|[1-9][0-9]{0,2})")
# print_dev_t(): "%u:%u\n", so no sign, no spaces, no leading zeros.
_DEV_NUMBERS = re.compile(r"(0|[1-9][0-9]{0,3}):(0|[1-9][0-9]{0,6})")
# "0x%04x\n", as drivers/pci/pci-sysfs.c prints vendor and device.
_PCI_ID = re.compile(r"0x([0-9a-fA-F]{4})")
# pci_name(): "%04x:%02x:%02x.%d"; the domain may be wider than four digits (Intel VMD: 10000).
PCI_ADDRESS = re.compile(r"[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
_DRIVER_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,64}")


@dataclass(frozen=True)
class _SysfsDevice:
    """What sysfs says about one ``accelN`` right now."""

    index: int
    major: int
    minor: int
    pci_bus_id: str  # "" when the parent is not a PCI function
    vendor_id: int
    device_id: int
    driver: str  # "" when no driver is bound

    @property
    def uuid(self) -> str:
        return f"ACCEL-{self.pci_bus_id}" if self.pci_bus_id else f"ACCEL-accel{self.index}"

    @property
    def name(self) -> str:
        driver = self.driver or "unbound"
        if not self.pci_bus_id:
            return f"{driver} accel{self.index}"
        return f"{driver} {self.vendor_id:04x}:{self.device_id:04x}"


def read_attribute(path: Path) -> str:
    """One sysfs attribute as text, without its trailing newline; HardwareError on anything that
    is not a short ASCII regular file."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        raise HardwareError(f"cannot read {path}: {error.strerror}") from error
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise HardwareError(f"{path} is not a sysfs attribute (not a regular file)")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_ATTRIBUTE_BYTES:
            chunk = os.read(descriptor, MAX_ATTRIBUTE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as error:
        raise HardwareError(f"cannot read {path}: {error.strerror}") from error
    finally:
        os.close(descriptor)
    if size > MAX_ATTRIBUTE_BYTES:
        raise HardwareError(f"{path} holds more than {MAX_ATTRIBUTE_BYTES} bytes")
    data = b"".join(chunks)
    data = data.removesuffix(b"\n")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError as error:
        raise HardwareError(f"{path}: not ASCII text ({data[:32]!r})") from error


def parse_dev_numbers(path: Path, text: str) -> tuple[int, int]:
    """``major:minor`` as a device's ``dev`` attribute holds it."""
    match = _DEV_NUMBERS.fullmatch(text)
    if match is None:
        raise HardwareError(f"{path}: expected '<major>:<minor>', got {text[:32]!r}")
    major, minor = int(match.group(1)), int(match.group(2))
    if major > _MAX_MAJOR or minor > _MAX_MINOR:
        raise HardwareError(f"{path}: {text!r} is not a Linux device number")
    return major, minor


def parse_pci_id(path: Path, text: str) -> int:
    """A 16-bit PCI vendor or device id as ``0x8086``."""
    match = _PCI_ID.fullmatch(text)
    if match is None:
        raise HardwareError(f"{path}: expected a PCI id like '0x1da3', got {text[:32]!r}")
    return int(match.group(1), 16)


def _resolve(path: Path) -> Path:
    try:
        return path.resolve(strict=True)
    # Python 3.11 reports a symlink loop as RuntimeError, later versions as OSError(ELOOP).
    except (OSError, RuntimeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise HardwareError(f"cannot resolve {path}: {reason}") from error


class AccelBackend:
    """Every ``/dev/accel`` device of the node, read from ``sys_root`` (``/sys``).

    Blocking calls, each a handful of small sysfs reads; nothing is cached, so the answer is what
    the kernel says now (hot-plug, rebinds).
    """

    vendor = ACCEL

    def __init__(self, sys_root: Path = Path("/sys"), dev_root: Path = Path("/dev")) -> None:
        self.sys_root = sys_root
        self.dev_root = dev_root
        self._class_dir = sys_root / "class" / "accel"

    def open(self) -> None:
        # Nothing to open: a kernel without CONFIG_DRM_ACCEL, or with no accel driver loaded,
        # has no class/accel directory, and that is a node with zero devices, not a fault.
        return None

    def close(self) -> None:
        return None

    def driver_version(self) -> str:
        """The kernel release: accel drivers are in-tree, versioned with the kernel."""
        if not self._class_dir.is_dir():
            return ""
        return os.uname().release

    def inventory(self) -> list[DeviceInfo]:
        devices: list[DeviceInfo] = []
        for index in self._indices():
            try:
                found = self._describe(index)
            except HardwareError:
                # Unplugged while we read it: the device is gone, so it is not in the inventory.
                if not os.path.lexists(self._class_dir / f"accel{index}"):
                    continue
                raise
            devices.append(
                DeviceInfo(
                    index=found.index,
                    uuid=found.uuid,
                    name=found.name,
                    serial="",
                    pci_bus_id=found.pci_bus_id,
                    pci_device_id=found.device_id << 16 | found.vendor_id,
                    minor=found.minor,
                    memory_total_bytes=0,
                    mig_current=None,
                    mig_pending=None,
                    instances=(),
                    vendor=ACCEL,
                    memory_units=1,
                    driver=found.driver,
                )
            )
        return devices

    def nodes(self, device: DeviceInfo) -> list[DeviceNode]:
        """The node a tenant of ``device`` opens, ``dev_root/accel/accelN``, checked against
        sysfs."""
        if device.vendor != ACCEL:
            raise HardwareError(f"{device.label} is not a /dev/accel device")
        current = self._describe(device.minor)
        if current.uuid != device.uuid:
            raise HardwareError(
                f"accel{device.minor} is now {current.uuid}, not {device.uuid}: the inventory is "
                "stale; refresh it before fencing"
            )
        path = self.dev_root / "accel" / f"accel{device.minor}"
        try:
            info = path.stat()
        except OSError as error:
            raise HardwareError(
                f"{device.label}: cannot stat {path}: {error.strerror} (is udev running and the "
                f"{current.driver or 'device'} driver loaded?)"
            ) from error
        if not stat.S_ISCHR(info.st_mode):
            raise HardwareError(f"{device.label}: {path} is not a character device")
        numbers = (os.major(info.st_rdev), os.minor(info.st_rdev))
        if numbers != (current.major, current.minor):
            raise HardwareError(
                f"{device.label}: {path} is {numbers[0]}:{numbers[1]} but sysfs says "
                f"{current.major}:{current.minor}; refusing to fence an unknown node"
            )
        return [DeviceNode(path, current.major, current.minor)]

    def reset(self, device: DeviceInfo) -> None:
        """PCI function reset: write ``1`` to ``/sys/bus/pci/devices/<bdf>/reset``.

        The kernel shows ``reset`` only for functions with a usable reset method
        (drivers/pci/pci-sysfs.c, ``pci_dev_reset_attr_is_visible``); its store accepts exactly 1
        and returns only once ``pci_reset_function`` has finished, with its error if it failed.
        """
        bdf = device.pci_bus_id
        if not PCI_ADDRESS.fullmatch(bdf):
            raise HardwareError(
                f"{device.label} has no PCI function reset: it is not a PCI device "
                f"(PCI address {bdf!r})"
            )
        function_dir = self.sys_root / "bus" / "pci" / "devices" / bdf
        if not function_dir.is_dir():
            raise HardwareError(f"{device.label}: PCI device {bdf} is gone ({function_dir})")
        path = function_dir / "reset"
        # Append mode: sysfs ignores the offset of an attribute write (sysfs_kf_write), and a
        # simulated tree's regular file then records one line per reset. No O_CREAT: a missing
        # attribute must stay missing.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            descriptor = os.open(path, flags)
        except OSError as error:
            if error.errno == errno.ENOENT:
                raise HardwareError(
                    f"{device.label} ({bdf}) has no PCI function reset: {path} does not exist "
                    "(the kernel found no reset method for this function)"
                ) from error
            raise HardwareError(f"cannot open {path}: {error.strerror}") from error
        try:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise HardwareError(f"{path} is not a sysfs attribute (not a regular file)")
            written = os.write(descriptor, b"1\n")
        except OSError as error:
            raise HardwareError(
                f"PCI function reset of {device.label} ({bdf}) failed: {error.strerror}"
            ) from error
        finally:
            os.close(descriptor)
        if written != 2:
            raise HardwareError(
                f"PCI function reset of {device.label} ({bdf}): short write to {path}"
            )

    def _indices(self) -> list[int]:
        try:
            names = [entry.name for entry in self._class_dir.iterdir()]
        except FileNotFoundError:
            return []
        except OSError as error:
            raise HardwareError(f"cannot list {self._class_dir}: {error.strerror}") from error
        indices: list[int] = []
        for name in names:
            match = _ACCEL_NAME.fullmatch(name)
            if match is None or int(match.group(1)) >= ACCEL_MAX_MINORS:
                raise HardwareError(
                    f"{self._class_dir} holds {name!r}, which is not an accel device"
                )
            indices.append(int(match.group(1)))
        return sorted(indices)

    def _describe(self, index: int) -> _SysfsDevice:
        entry = self._class_dir / f"accel{index}"
        major, minor = parse_dev_numbers(entry / "dev", read_attribute(entry / "dev"))
        if (major, minor) != (ACCEL_MAJOR, index):
            raise HardwareError(
                f"{entry / 'dev'} says {major}:{minor}; an accel{index} is {ACCEL_MAJOR}:{index}"
            )
        parent_link = entry / "device"
        if not os.path.lexists(parent_link):
            return _SysfsDevice(index, major, minor, "", 0, 0, "")
        parent = _resolve(parent_link)
        driver = self._driver(parent)
        if not self._is_pci(parent):
            return _SysfsDevice(index, major, minor, "", 0, 0, driver)
        bdf = parent.name
        if not PCI_ADDRESS.fullmatch(bdf):
            raise HardwareError(f"{parent_link} names PCI function {bdf!r}: not a PCI address")
        listed = self.sys_root / "bus" / "pci" / "devices" / bdf
        if _resolve(listed) != parent:
            raise HardwareError(f"{listed} is not the device {parent_link} points to")
        vendor_id = parse_pci_id(parent / "vendor", read_attribute(parent / "vendor"))
        device_id = parse_pci_id(parent / "device", read_attribute(parent / "device"))
        return _SysfsDevice(index, major, minor, bdf, vendor_id, device_id, driver)

    def _is_pci(self, parent: Path) -> bool:
        subsystem = parent / "subsystem"
        pci_bus = self.sys_root / "bus" / "pci"
        # A node without PCI (an Arm SoC's platform NPU) has no bus/pci at all.
        if not os.path.lexists(subsystem) or not pci_bus.is_dir():
            return False
        return _resolve(subsystem) == _resolve(pci_bus)

    def _driver(self, parent: Path) -> str:
        link = parent / "driver"
        if not os.path.lexists(link):
            return ""
        try:
            name = link.readlink().name
        except OSError as error:
            raise HardwareError(f"cannot read {link}: {error.strerror}") from error
        if not _DRIVER_NAME.fullmatch(name):
            raise HardwareError(f"{link} names driver {name[:64]!r}: not a driver name")
        return name
