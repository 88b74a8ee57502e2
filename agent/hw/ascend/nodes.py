"""The device nodes an Ascend partition needs, read from the nodes themselves.

A whole NPU is ``/dev/davinci<physical id>`` (DCMI API reference: "run ``ls /dev/davinci*`` to
obtain the physical chip ID"); a vNPU is ``/dev/vdavinci<vdev id>`` (driver
``DEVDRV_VDEVICE_NAME``; MindCluster: "virtual chip IDs: ls /dev/vdavinci*"). Every process on an
NPU also opens the three nodes the driver shares between all chips, which MindCluster's device
plugin mounts into every container: ``davinci_manager``, ``devmm_svm`` (shared virtual memory) and
``hisi_hdc`` (host-device communication).

The Ascend driver registers its majors dynamically and publishes no table of minors, so majors
and minors come from ``stat(2)`` of each node. Fail closed: a node that is missing or is not a
character device raises HardwareError naming it, so no fence is built from a guess.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from agent.errors import HardwareError
from agent.hw.devnodes import DeviceNode

SHARED_NODES = ("davinci_manager", "devmm_svm", "hisi_hdc")


def npu_nodes(dev_root: Path, physical_id: int) -> list[DeviceNode]:
    """Nodes of a whole NPU: its ``davinci<physical id>``, then the shared ones."""
    return _nodes(dev_root, f"davinci{physical_id}")


def vnpu_nodes(dev_root: Path, vdev_id: int) -> list[DeviceNode]:
    """Nodes of a vNPU: its ``vdavinci<vdev id>``, then the shared ones."""
    return _nodes(dev_root, f"vdavinci{vdev_id}")


def _nodes(dev_root: Path, own: str) -> list[DeviceNode]:
    return [character_node(dev_root / name) for name in (own, *SHARED_NODES)]


def character_node(path: Path) -> DeviceNode:
    """The character device at ``path`` with its major and minor."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise HardwareError(
            f"{path} does not exist: is the Ascend driver loaded, and the id right?"
        ) from None
    except OSError as error:
        raise HardwareError(f"cannot stat {path}: {error.strerror}") from error
    if not stat.S_ISCHR(info.st_mode):
        raise HardwareError(f"{path} is not a character device; refusing to fence by it")
    return DeviceNode(path, os.major(info.st_rdev), os.minor(info.st_rdev))
