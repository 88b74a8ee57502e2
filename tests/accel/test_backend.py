"""AccelBackend against the simulated sysfs tree and real char nodes: discovery, the nodes a
fence gets, and every way the tree can disagree with itself ending in HardwareError."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest

from agent.errors import HardwareError
from agent.hw.accel import AccelBackend
from agent.hw.devnodes import DeviceNode
from agent.hw.model import ACCEL, DeviceSource
from agent.sim.accel import init_accel_tree
from tests.accel.tree import AccelNode, make_accel_node


def test_discovers_both_cards(accel_node: AccelNode) -> None:
    backend = accel_node.backend
    backend.open()
    devices = backend.inventory()
    backend.close()

    assert [d.index for d in devices] == [0, 1]
    assert [d.uuid for d in devices] == ["ACCEL-0000:3b:00.0", "ACCEL-0000:3c:00.0"]
    assert [d.pci_bus_id for d in devices] == ["0000:3b:00.0", "0000:3c:00.0"]
    for index, device in enumerate(devices):
        # Gaudi2 as drivers/accel/habanalabs lists it: vendor 0x1da3, device 0x1020.
        assert device.name == "habanalabs 1da3:1020"
        assert device.pci_device_id == 0x10201DA3
        assert device.driver == "habanalabs"
        assert device.minor == index
        assert device.vendor == ACCEL
        assert (device.kind, device.label) == ("accel", f"accel {index}")
        assert device.memory_total_bytes == 0
        assert device.memory_units == 1
        assert (device.mig_current, device.mig_pending, device.instances) == (None, None, ())
        assert not device.reset_required
    assert backend.driver_version() == os.uname().release


def test_is_a_device_source(accel_node: AccelNode) -> None:
    source: DeviceSource = accel_node.backend
    assert source.vendor == ACCEL


def test_numbers_come_from_sysfs_in_numeric_order(tmp_path: Path) -> None:
    node = make_accel_node(tmp_path, count=12)
    devices = node.backend.inventory()
    # accel10 sorts before accel2 as text; the inventory is by number.
    assert [d.index for d in devices] == list(range(12))
    assert devices[11].pci_bus_id == "0000:46:00.0"


def test_node_without_accel_subsystem_has_no_devices(tmp_path: Path) -> None:
    backend = AccelBackend(sys_root=tmp_path / "sys", dev_root=tmp_path / "dev")
    backend.open()
    assert backend.inventory() == []
    assert backend.driver_version() == ""
    backend.close()


def test_init_is_idempotent(accel_node: AccelNode) -> None:
    before = accel_node.backend.inventory()
    node_inode = (accel_node.dev_root / "accel" / "accel0").stat().st_ino
    accel_node.backend.reset(before[0])

    init_accel_tree(accel_node.sys_root, 2, accel_node.dev_root)

    assert accel_node.backend.inventory() == before
    assert (accel_node.dev_root / "accel" / "accel0").stat().st_ino == node_inode
    assert (accel_node.function(0) / "reset").read_bytes() == b"1\n"


def test_init_with_fewer_cards_unplugs_the_rest(accel_node: AccelNode) -> None:
    init_accel_tree(accel_node.sys_root, 1, accel_node.dev_root)
    assert [d.uuid for d in accel_node.backend.inventory()] == ["ACCEL-0000:3b:00.0"]
    assert not (accel_node.dev_root / "accel" / "accel1").exists()


def test_init_replaces_a_node_with_wrong_numbers(accel_node: AccelNode) -> None:
    path = accel_node.dev_root / "accel" / "accel1"
    path.unlink()
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(261, 9))
    init_accel_tree(accel_node.sys_root, 2, accel_node.dev_root)
    assert os.minor(path.stat().st_rdev) == 1


def test_nodes_match_the_kernel(accel_node: AccelNode) -> None:
    backend = accel_node.backend
    for device in backend.inventory():
        path = accel_node.dev_root / "accel" / f"accel{device.index}"
        info = path.stat()
        assert stat.S_ISCHR(info.st_mode)
        assert backend.nodes(device) == [
            DeviceNode(path, os.major(info.st_rdev), os.minor(info.st_rdev))
        ]
        assert (os.major(info.st_rdev), os.minor(info.st_rdev)) == (261, device.index)


def test_node_with_other_numbers_is_refused(accel_node: AccelNode) -> None:
    device = accel_node.backend.inventory()[0]
    path = accel_node.dev_root / "accel" / "accel0"
    path.unlink()
    # accel1's numbers under accel0's name: a fence built from it would guard the wrong card.
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(261, 1))
    with pytest.raises(HardwareError, match=r"261:1 but sysfs says 261:0"):
        accel_node.backend.nodes(device)


@pytest.mark.parametrize(
    ("mode", "numbers", "refusal"),
    [
        (stat.S_IFCHR, (262, 0), "262:0"),  # another major
        (stat.S_IFBLK, (261, 0), "not a character device"),
    ],
    ids=["other major", "block device"],
)
def test_a_node_that_is_not_the_devices_is_refused(
    accel_node: AccelNode, mode: int, numbers: tuple[int, int], refusal: str
) -> None:
    device = accel_node.backend.inventory()[0]
    path = accel_node.dev_root / "accel" / "accel0"
    path.unlink()
    os.mknod(path, 0o600 | mode, os.makedev(*numbers))
    with pytest.raises(HardwareError, match=refusal):
        accel_node.backend.nodes(device)


def test_missing_node_is_refused(accel_node: AccelNode) -> None:
    device = accel_node.backend.inventory()[1]
    (accel_node.dev_root / "accel" / "accel1").unlink()
    with pytest.raises(HardwareError, match="cannot stat"):
        accel_node.backend.nodes(device)


def test_nodes_refuse_a_stale_inventory(accel_node: AccelNode) -> None:
    device = accel_node.backend.inventory()[0]
    moved = dataclasses.replace(device, uuid="ACCEL-0000:99:00.0")
    with pytest.raises(HardwareError, match="stale"):
        accel_node.backend.nodes(moved)


def test_nodes_refuse_a_device_of_another_vendor(accel_node: AccelNode) -> None:
    device = dataclasses.replace(accel_node.backend.inventory()[0], vendor="nvidia")
    with pytest.raises(HardwareError, match="not a /dev/accel device"):
        accel_node.backend.nodes(device)


def test_sysfs_dev_with_wrong_minor_is_refused(accel_node: AccelNode) -> None:
    (accel_node.entry(0) / "dev").write_text("261:5\n")
    with pytest.raises(HardwareError, match=r"accel0/dev says 261:5"):
        accel_node.backend.inventory()


def test_sysfs_dev_with_wrong_major_is_refused(accel_node: AccelNode) -> None:
    (accel_node.entry(1) / "dev").write_text("226:1\n")
    with pytest.raises(HardwareError, match="226:1"):
        accel_node.backend.inventory()


def test_oversized_attribute_is_refused(accel_node: AccelNode) -> None:
    (accel_node.function(0) / "vendor").write_bytes(b"0x1da3" + b" " * (1 << 20))
    with pytest.raises(HardwareError, match="more than 4096 bytes"):
        accel_node.backend.inventory()


def test_fifo_in_place_of_an_attribute_does_not_block(accel_node: AccelNode) -> None:
    dev = accel_node.entry(0) / "dev"
    dev.unlink()
    os.mkfifo(dev)
    with pytest.raises(HardwareError, match="not a sysfs attribute"):
        accel_node.backend.inventory()


def test_symlinked_attribute_is_refused(accel_node: AccelNode) -> None:
    vendor = accel_node.function(0) / "vendor"
    vendor.unlink()
    vendor.symlink_to(accel_node.function(1) / "vendor")
    with pytest.raises(HardwareError, match="cannot read"):
        accel_node.backend.inventory()


def test_unknown_class_entry_is_refused(accel_node: AccelNode) -> None:
    (accel_node.sys_root / "class" / "accel" / "accel_x").mkdir()
    with pytest.raises(HardwareError, match="accel_x"):
        accel_node.backend.inventory()


def test_device_link_loop_is_refused(accel_node: AccelNode) -> None:
    link = accel_node.entry(0) / "device"
    link.unlink()
    link.symlink_to("device")
    with pytest.raises(HardwareError, match="cannot resolve"):
        accel_node.backend.inventory()


def test_pci_listing_that_disagrees_is_refused(accel_node: AccelNode) -> None:
    listed = accel_node.sys_root / "bus" / "pci" / "devices" / "0000:3b:00.0"
    listed.unlink()
    listed.symlink_to(accel_node.function(1))
    with pytest.raises(HardwareError, match="is not the device"):
        accel_node.backend.inventory()


def test_unbound_function_is_named_so(accel_node: AccelNode) -> None:
    (accel_node.function(1) / "driver").unlink()
    device = accel_node.backend.inventory()[1]
    assert (device.driver, device.name) == ("", "unbound 1da3:1020")


def test_device_without_pci_parent(tmp_path: Path) -> None:
    """A platform NPU (an Arm SoC's): no PCI address, so the accel name is its identity."""
    sys_root = tmp_path / "sys"
    platform = sys_root / "devices" / "platform" / "fdab0000.npu"
    accel = platform / "accel" / "accel0"
    accel.mkdir(parents=True)
    (sys_root / "bus" / "platform" / "drivers" / "rocket").mkdir(parents=True)
    (platform / "subsystem").symlink_to(sys_root / "bus" / "platform")
    (platform / "driver").symlink_to(sys_root / "bus" / "platform" / "drivers" / "rocket")
    (accel / "dev").write_text("261:0\n")
    (accel / "device").symlink_to("../..")
    (sys_root / "class" / "accel").mkdir(parents=True)
    (sys_root / "class" / "accel" / "accel0").symlink_to(accel)

    backend = AccelBackend(sys_root=sys_root, dev_root=tmp_path / "dev")
    [device] = backend.inventory()
    assert (device.uuid, device.pci_bus_id, device.name, device.driver) == (
        "ACCEL-accel0",
        "",
        "rocket accel0",
        "rocket",
    )
    assert device.pci_device_id == 0
    with pytest.raises(HardwareError, match="has no PCI function reset: it is not a PCI device"):
        backend.reset(device)
