"""A simulated ``/dev/accel`` node: the sysfs tree the kernel's accel subsystem shows, plus real
char nodes.

The tree is laid out as on a host with Gaudi2 cards: every card is a PCI function behind its own
root port, ``class/accel/accelN`` links into the function's directory, and ``bus/pci/devices``
and the driver's directory link to the same function. Links are relative, as the kernel's are,
so the tree can be moved. ``reset`` is an empty regular file: the backend appends ``1`` to it
(as it would write to the kernel's attribute), so every reset leaves one line behind for
``reset_count``.

The nodes ``dev_root/accel/accelN`` are real character devices (``mknod``) with major 261, so the
kernel's cgroup device checks apply to them as to real ones; with no accel driver behind them,
``open`` fails with ENXIO where the cgroup allows it and EPERM where it denies it.

``init_accel_tree`` is idempotent: files are rewritten, links and nodes that are already right
are kept, and reset files keep their record.
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.errors import ValidationError
from agent.hw.accel import ACCEL_MAJOR
from agent.sim.native import make_char_node

# Habana Labs' PCI vendor id and the Gaudi2 device id, as drivers/accel/habanalabs lists them
# (PCI_VENDOR_ID_HABANALABS, PCI_IDS_GAUDI2). Habana is Intel's, but the cards keep 0x1da3.
SIM_VENDOR_ID = 0x1DA3
SIM_DEVICE_ID = 0x1020
SIM_DRIVER = "habanalabs"
# PCI class 0x12 "processing accelerator", subclass 0, as lspci shows Gaudi cards.
_SIM_CLASS = "0x120000"
MAX_SIM_DEVICES = 16
_FIRST_BUS = 0x3B


def sim_pci_address(index: int) -> str:
    """The PCI address of simulated card ``index``: 0000:3b:00.0, 0000:3c:00.0, ..."""
    return f"0000:{_FIRST_BUS + index:02x}:00.0"


def init_accel_tree(root: Path, count: int, dev_root: Path) -> None:
    """Build (or bring up to date) a sysfs tree under ``root`` with ``count`` Gaudi2 cards and
    their nodes under ``dev_root/accel``. Needs root (mknod)."""
    if not 0 <= count <= MAX_SIM_DEVICES:
        raise ValidationError(
            f"a simulated node has 0 to {MAX_SIM_DEVICES} accel devices, not {count}"
        )
    pci_bus = root / "bus" / "pci"
    bus_devices = pci_bus / "devices"
    driver_dir = pci_bus / "drivers" / SIM_DRIVER
    class_dir = root / "class" / "accel"
    for directory in (bus_devices, driver_dir, class_dir, dev_root / "accel"):
        directory.mkdir(parents=True, exist_ok=True)

    for index in range(count):
        bdf = sim_pci_address(index)
        function = root / "devices" / "pci0000:00" / f"0000:00:{index + 1:02x}.0" / bdf
        function.mkdir(parents=True, exist_ok=True)
        (function / "vendor").write_text(f"0x{SIM_VENDOR_ID:04x}\n")
        (function / "device").write_text(f"0x{SIM_DEVICE_ID:04x}\n")
        (function / "class").write_text(f"{_SIM_CLASS}\n")
        reset = function / "reset"
        if not reset.exists():
            reset.write_bytes(b"")
        _link(function / "subsystem", pci_bus)
        _link(function / "driver", driver_dir)
        _link(bus_devices / bdf, function)
        _link(driver_dir / bdf, function)

        accel = function / "accel" / f"accel{index}"
        accel.mkdir(parents=True, exist_ok=True)
        (accel / "dev").write_text(f"{ACCEL_MAJOR}:{index}\n")
        _link(accel / "device", function)
        _link(accel / "subsystem", class_dir)
        _link(class_dir / f"accel{index}", accel)
        make_char_node(dev_root / "accel" / f"accel{index}", ACCEL_MAJOR, index)

    # A smaller count than last time: the cards beyond it are unplugged (their function
    # directories stay, unreachable, as the kernel's would not, which nothing here reads).
    for entry in class_dir.iterdir():
        stale_index = _accel_index(entry.name)
        if stale_index is None or stale_index < count:
            continue
        entry.unlink()
        for stale in (
            dev_root / "accel" / entry.name,
            bus_devices / sim_pci_address(stale_index),
            driver_dir / sim_pci_address(stale_index),
        ):
            if os.path.lexists(stale):
                stale.unlink()


def reset_count(sys_root: Path, bdf: str) -> int:
    """How many PCI function resets the simulated card at ``bdf`` has received."""
    path = sys_root / "bus" / "pci" / "devices" / bdf / "reset"
    return sum(1 for line in path.read_bytes().split(b"\n") if line == b"1")


def _accel_index(name: str) -> int | None:
    digits = name.removeprefix("accel")
    if digits == name or not digits.isascii() or not digits.isdigit():
        return None
    return int(digits)


def _link(link: Path, target: Path) -> None:
    relative = os.path.relpath(target, link.parent)
    if link.is_symlink():
        if str(link.readlink()) == relative:
            return
        link.unlink()
    link.symlink_to(relative)
