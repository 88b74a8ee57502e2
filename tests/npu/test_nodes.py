"""Ascend device nodes read from real nodes made with mknod(2) in a temporary /dev."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.errors import HardwareError
from agent.hw.ascend.nodes import SHARED_NODES, character_node, npu_nodes, vnpu_nodes
from agent.hw.devnodes import DeviceNode

# Majors as a host might have them: the Ascend driver registers its majors dynamically.
DAVINCI_MAJOR, MANAGER_MAJOR, SVM_MAJOR, HDC_MAJOR, VDAVINCI_MAJOR = 236, 237, 238, 239, 235


def mknod(path: Path, major: int, minor: int, kind: int = stat.S_IFCHR) -> None:
    try:
        os.mknod(path, kind | 0o600, os.makedev(major, minor))
    except PermissionError:
        pytest.skip("mknod needs CAP_MKNOD (the suite runs as root)")


@pytest.fixture
def dev(tmp_path: Path) -> Path:
    root = tmp_path / "dev"
    root.mkdir()
    mknod(root / "davinci3", DAVINCI_MAJOR, 3)
    mknod(root / "davinci_manager", MANAGER_MAJOR, 0)
    mknod(root / "devmm_svm", SVM_MAJOR, 0)
    mknod(root / "hisi_hdc", HDC_MAJOR, 0)
    mknod(root / "vdavinci148", VDAVINCI_MAJOR, 148)
    return root


SHARED = [
    ("davinci_manager", MANAGER_MAJOR, 0),
    ("devmm_svm", SVM_MAJOR, 0),
    ("hisi_hdc", HDC_MAJOR, 0),
]


def expected(dev: Path, nodes: list[tuple[str, int, int]]) -> list[DeviceNode]:
    return [DeviceNode(dev / name, major, minor) for name, major, minor in nodes]


def test_a_whole_npu_is_its_davinci_node_and_the_shared_ones(dev: Path) -> None:
    assert npu_nodes(dev, 3) == expected(dev, [("davinci3", DAVINCI_MAJOR, 3), *SHARED])
    assert SHARED_NODES == ("davinci_manager", "devmm_svm", "hisi_hdc")


def test_a_vnpu_is_its_vdavinci_node_and_the_shared_ones(dev: Path) -> None:
    assert vnpu_nodes(dev, 148) == expected(dev, [("vdavinci148", VDAVINCI_MAJOR, 148), *SHARED])


def test_majors_and_minors_come_from_the_node_itself(dev: Path) -> None:
    (dev / "davinci3").unlink()
    mknod(dev / "davinci3", 511, 1048575)  # the largest major and minor Linux has
    assert npu_nodes(dev, 3)[0] == DeviceNode(dev / "davinci3", 511, 1048575)


@pytest.mark.parametrize(
    ("missing", "call"),
    [
        ("davinci5", lambda dev: npu_nodes(dev, 5)),
        ("vdavinci100", lambda dev: vnpu_nodes(dev, 100)),
        ("davinci_manager", lambda dev: npu_nodes(dev, 3)),
        ("devmm_svm", lambda dev: vnpu_nodes(dev, 148)),
        ("hisi_hdc", lambda dev: npu_nodes(dev, 3)),
    ],
)
def test_a_missing_node_fails_closed_naming_it(
    dev: Path, missing: str, call: Callable[[Path], list[DeviceNode]]
) -> None:
    (dev / missing).unlink(missing_ok=True)
    with pytest.raises(HardwareError, match=f"^{dev / missing} does not exist"):
        call(dev)


def test_a_node_that_is_not_a_character_device_fails_closed(dev: Path) -> None:
    (dev / "hisi_hdc").unlink()
    (dev / "hisi_hdc").write_text("")
    with pytest.raises(HardwareError, match=f"^{dev / 'hisi_hdc'} is not a character device"):
        npu_nodes(dev, 3)
    (dev / "davinci3").unlink()
    mknod(dev / "davinci3", 8, 0, stat.S_IFBLK)
    with pytest.raises(HardwareError, match=f"^{dev / 'davinci3'} is not a character device"):
        character_node(dev / "davinci3")
    (dev / "vdavinci7").mkdir()
    with pytest.raises(HardwareError, match="is not a character device"):
        character_node(dev / "vdavinci7")
    os.mkfifo(dev / "vdavinci8")
    with pytest.raises(HardwareError, match="is not a character device"):
        character_node(dev / "vdavinci8")


def test_a_symlink_is_resolved_to_the_device_it_names(dev: Path) -> None:
    (dev / "davinci9").symlink_to(dev / "davinci3")
    assert character_node(dev / "davinci9") == DeviceNode(dev / "davinci9", DAVINCI_MAJOR, 3)
    (dev / "davinci10").symlink_to(dev / "nowhere")
    with pytest.raises(HardwareError, match="davinci10 does not exist"):
        character_node(dev / "davinci10")
