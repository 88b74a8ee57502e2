"""The Ascend part of a simulated node: dcmi-sim's topology and the ``davinci`` device tree.

Device nodes are real character devices (``mknod``) with majors no driver on this machine uses,
as for the simulated GPUs: the kernel's cgroup device checks apply to them as on an NPU node
(ENXIO when a fence allows one, EPERM when it denies it). Per chip with physical id ``p``:
``/dev/davinci<p>`` and the nodes of its 16 possible vNPUs, ``/dev/vdavinci<100 + 16p + k>``
(the driver makes a vNPU's node when it creates the vNPU; the simulation makes them all up front,
as it does MIG capability nodes). Shared by every NPU partition: ``/dev/davinci_manager``,
``/dev/devmm_svm``, ``/dev/hisi_hdc``.
"""

from __future__ import annotations

from pathlib import Path

from agent.sim.native import ensure_built

_REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DCMI_SIM_SOURCE = _REPO_ROOT / "native" / "dcmi-sim"
DCMI_SIM_LIBRARY = DCMI_SIM_SOURCE / "build" / "libdcmi.so"

# Topology item -> dcmi-sim model (docs/dcmi-sim.md, "Templates and chips").
NPU_MODELS = {"ascend910": "910A", "ascend910b": "910B3"}
# /proc/devices names of the simulated node's NPU majors (assumed: the real driver's names are
# not what accelguard reads; it takes majors from the nodes themselves, agent/hw/ascend/nodes.py).
NPU_MAJOR_NAMES = ("davinci", "vdavinci", "davinci_manager", "devmm_svm", "hisi_hdc")
SHARED_NODES = ("davinci_manager", "devmm_svm", "hisi_hdc")
VDEV_OFFSET = 100  # vNPU k of chip p is vdev 100 + 16p + k (docs/dcmi-sim.md, "Ids")
VNPUS_PER_CHIP = 16


def ensure_dcmi_sim_library() -> Path:
    """Build dcmi-sim if this checkout has its source but not the library yet."""
    return ensure_built(DCMI_SIM_SOURCE, DCMI_SIM_LIBRARY)


def dcmi_topology(models: tuple[str, ...]) -> str:
    lines = ["# accelguard simulated node: npu <logic id> <model>"]
    lines += [f"npu {index} {model}" for index, model in enumerate(models)]
    return "\n".join(lines) + "\n"


def npu_nodes(models: tuple[str, ...]) -> list[tuple[str, str, int]]:
    """(path under dev, major name, minor) of every NPU node the node has."""
    nodes = [(name, name, 0) for name in SHARED_NODES]
    for physical in range(len(models)):
        nodes.append((f"davinci{physical}", "davinci", physical))
        for k in range(VNPUS_PER_CHIP):
            vdev = VDEV_OFFSET + VNPUS_PER_CHIP * physical + k
            nodes.append((f"vdavinci{vdev}", "vdavinci", vdev))
    return nodes
