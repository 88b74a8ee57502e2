"""Which device nodes a partition needs, from the driver's own tables.

Majors come from ``/proc/devices`` (``nvidia-uvm`` and ``nvidia-caps`` majors are dynamic) and MIG
capability minors from ``/proc/driver/nvidia-caps/mig-minors`` — read, never computed, because the
driver owns that numbering (NVIDIA MIG user guide, "Device Nodes and Capabilities"). Both roots are
configurable so a simulated node points them at its own tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.errors import HardwareError

# Fixed by the NVIDIA driver: /dev/nvidiaN and /dev/nvidiactl are char major 195.
NVIDIA_MAJOR = 195
NVIDIACTL_MINOR = 255
# /proc/devices names for major 195 differ between driver generations.
_FRONTEND_NAMES = ("nvidia-frontend", "nvidia")
_MAX_PROC_FILE = 1 << 20


@dataclass(frozen=True, order=True)
class DeviceNode:
    path: Path
    major: int
    minor: int
    kind: str = "c"


def _read(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            return handle.read(_MAX_PROC_FILE).decode("ascii", errors="replace")
    except OSError as error:
        raise HardwareError(f"cannot read {path}: {error.strerror}") from error


def char_majors(proc_root: Path) -> dict[str, int]:
    """Character-device majors by driver name, from ``/proc/devices``."""
    majors: dict[str, int] = {}
    in_char = False
    for line in _read(proc_root / "devices").splitlines():
        stripped = line.strip()
        if stripped.endswith(":"):
            in_char = stripped == "Character devices:"
            continue
        parts = stripped.split()
        if in_char and len(parts) == 2 and parts[0].isdigit():
            majors.setdefault(parts[1], int(parts[0]))
    return majors


def mig_minors(proc_root: Path) -> dict[str, int]:
    """``gpu0/gi1/access`` -> minor, from ``driver/nvidia-caps/mig-minors``."""
    path = proc_root / "driver" / "nvidia-caps" / "mig-minors"
    minors: dict[str, int] = {}
    for number, line in enumerate(_read(path).splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].isdigit():
            raise HardwareError(f"{path}:{number}: expected '<capability> <minor>', got {line!r}")
        minors[parts[0]] = int(parts[1])
    return minors


# Nodes every partition of a vendor opens: NVIDIA's control and UVM nodes, Ascend's manager,
# shared-virtual-memory and host-device-communication nodes.
SHARED_NODE_NAMES = frozenset(
    {"nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "davinci_manager", "devmm_svm", "hisi_hdc"}
)


def own_nodes(nodes: list[DeviceNode]) -> list[DeviceNode]:
    """The nodes no other partition shares: a MIG instance's GI and CI capabilities, or a whole
    GPU's /dev/nvidiaN, an NPU's /dev/davinciN, a vNPU's /dev/vdavinciN, /dev/accel/accelN."""
    caps = [n for n in nodes if n.path.parent.name == "nvidia-caps"]
    return caps or [n for n in nodes if n.path.name not in SHARED_NODE_NAMES]


class DeviceNodeMap:
    """Resolves partitions to the device nodes a tenant must (and may only) open."""

    def __init__(self, dev_root: Path, proc_root: Path) -> None:
        self.dev_root = dev_root
        self.proc_root = proc_root
        self._majors: dict[str, int] | None = None
        self._minors: dict[str, int] | None = None
        # A MIG instance's nodes, built from the tables above (a grant asks for them).
        self._mig: dict[tuple[int, int, int], tuple[DeviceNode, ...]] = {}

    def invalidate(self) -> None:
        """Forget the cached driver tables; they change only when the driver is (re)loaded, which
        the inventory notices, so it calls this on every refresh."""
        self._majors = None
        self._minors = None
        self._mig = {}

    def majors(self) -> dict[str, int]:
        if self._majors is None:
            self._majors = char_majors(self.proc_root)
        return self._majors

    def minors(self) -> dict[str, int]:
        if self._minors is None:
            self._minors = mig_minors(self.proc_root)
        return self._minors

    def _uvm_major(self, majors: dict[str, int]) -> int:
        if "nvidia-uvm" not in majors:
            raise HardwareError(
                f"{self.proc_root / 'devices'} has no nvidia-uvm entry: is nvidia-uvm loaded?"
            )
        return majors["nvidia-uvm"]

    def gpu_nodes(self, gpu_minor: int) -> list[DeviceNode]:
        """Nodes of a whole GPU: its /dev/nvidiaN plus the shared control and UVM nodes."""
        majors = self.majors()
        if not any(name in majors for name in _FRONTEND_NAMES):
            raise HardwareError(
                f"{self.proc_root / 'devices'} lists no NVIDIA driver: is the driver loaded?"
            )
        uvm = self._uvm_major(majors)
        return [
            DeviceNode(self.dev_root / "nvidiactl", NVIDIA_MAJOR, NVIDIACTL_MINOR),
            DeviceNode(self.dev_root / "nvidia-uvm", uvm, 0),
            DeviceNode(self.dev_root / "nvidia-uvm-tools", uvm, 1),
            DeviceNode(self.dev_root / f"nvidia{gpu_minor}", NVIDIA_MAJOR, gpu_minor),
        ]

    def mig_nodes(
        self, gpu_minor: int, gpu_instance_id: int, compute_instance_id: int
    ) -> list[DeviceNode]:
        """Nodes of a MIG instance: the parent GPU's nodes plus its GI and CI capabilities."""
        key = (gpu_minor, gpu_instance_id, compute_instance_id)
        known = self._mig.get(key)
        if known is not None:
            return list(known)
        majors = self.majors()
        if "nvidia-caps" not in majors:
            raise HardwareError(f"{self.proc_root / 'devices'} has no nvidia-caps entry")
        caps = majors["nvidia-caps"]
        minors = self.minors()
        nodes = self.gpu_nodes(gpu_minor)
        for capability in (
            f"gpu{gpu_minor}/gi{gpu_instance_id}/access",
            f"gpu{gpu_minor}/gi{gpu_instance_id}/ci{compute_instance_id}/access",
        ):
            if capability not in minors:
                raise HardwareError(f"mig-minors has no entry for {capability}")
            minor = minors[capability]
            nodes.append(
                DeviceNode(self.dev_root / "nvidia-caps" / f"nvidia-cap{minor}", caps, minor)
            )
        self._mig[key] = tuple(nodes)
        return nodes

    def all_gpu_nodes(self, gpu_minors: list[int]) -> list[DeviceNode]:
        """Every NVIDIA node of the node, for tests and for proving a deny covers them all."""
        result: set[DeviceNode] = set()
        for minor in gpu_minors:
            result.update(self.gpu_nodes(minor))
        majors = self.majors()
        if "nvidia-caps" in majors:
            for capability, cap_minor in self.minors().items():
                if capability.startswith("gpu"):
                    result.add(
                        DeviceNode(
                            self.dev_root / "nvidia-caps" / f"nvidia-cap{cap_minor}",
                            majors["nvidia-caps"],
                            cap_minor,
                        )
                    )
        return sorted(result)
