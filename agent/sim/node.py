"""``accelguard sim init``: build a simulated accelerator node under one directory.

Only the silicon is simulated. The device nodes are real character devices (``mknod``) with the
NVIDIA majors (and, for NPUs and /dev/accel devices, majors of their own: agent/sim/npu.py, 261),
so the kernel's cgroup device checks apply to them exactly as on a GPU node: with no driver
behind the major, ``open`` fails with ENXIO when the cgroup allows it and EPERM when the cgroup
denies it. A topology may mix GPUs, Ascend NPUs and /dev/accel devices (``h100x1,ascend910bx2``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from agent.config import parse_config, to_toml
from agent.errors import HardwareError, ValidationError
from agent.hw.devnodes import NVIDIA_MAJOR, char_majors
from agent.sim.accel import init_accel_tree
from agent.sim.native import ensure_built, make_char_node
from agent.sim.npu import (
    NPU_MAJOR_NAMES,
    NPU_MODELS,
    dcmi_topology,
    ensure_dcmi_sim_library,
    npu_nodes,
)

MODELS = {"h100": "H100-80GB", "a100": "A100-40GB", "a100-80": "A100-80GB"}
_TOPOLOGY_HELP = (
    "expected items like h100x2, a100x2, a100-80x1, ascend910x8, ascend910bx8, accel2 "
    "(comma-separated; at most 8 GPUs, 16 NPUs, 8 accel devices)"
)
# mig-minors layout, as the driver lays it out: "config" and "monitor", then per GPU 15 GPU
# instances, each with its access capability followed by those of its 8 compute instances.
_GIS_PER_GPU = 15
_CIS_PER_GI = 8
_REPO_ROOT = Path(__file__).resolve().parent.parent.parent
NVML_SIM_SOURCE = _REPO_ROOT / "native" / "nvml-sim"
NVML_SIM_LIBRARY = NVML_SIM_SOURCE / "build" / "libnvidia-ml.so.1"


@dataclass(frozen=True)
class SimNode:
    root: Path
    config_path: Path
    gpus: tuple[str, ...]
    npus: tuple[str, ...] = ()
    accels: int = 0

    def describe(self) -> str:
        parts = []
        if self.gpus:
            parts.append(f"{len(self.gpus)} GPUs ({', '.join(self.gpus)})")
        if self.npus:
            parts.append(f"{len(self.npus)} NPUs ({', '.join(self.npus)})")
        if self.accels:
            parts.append(f"{self.accels} accel devices")
        return " and ".join(parts)


@dataclass(frozen=True)
class Topology:
    gpus: tuple[str, ...]  # model per GPU index
    npus: tuple[str, ...] = ()  # dcmi-sim model per NPU logic id
    accels: int = 0


def parse_topology(text: str) -> Topology:
    """``h100x2`` / ``h100x1,a100-80x1`` / ``ascend910bx8`` / ``h100x1,ascend910bx2,accel2``."""
    gpus: list[str] = []
    npus: list[str] = []
    accels = 0
    for raw in text.split(","):
        item = raw.strip()
        gpu = re.fullmatch(r"(h100|a100-80|a100)x([1-8])", item)
        npu = re.fullmatch(r"(ascend910b|ascend910)x([1-9]|1[0-6])", item)
        accel = re.fullmatch(r"accel([1-8])", item)
        if gpu is not None:
            gpus.extend([MODELS[gpu.group(1)]] * int(gpu.group(2)))
        elif npu is not None:
            npus.extend([NPU_MODELS[npu.group(1)]] * int(npu.group(2)))
        elif accel is not None:
            accels += int(accel.group(1))
        else:
            raise ValidationError(f"topology {text!r}: {_TOPOLOGY_HELP}")
    if len(gpus) > 8 or len(npus) > 16 or accels > 8:
        raise ValidationError(f"topology {text!r}: {_TOPOLOGY_HELP}")
    return Topology(tuple(gpus), tuple(npus), accels)


def mig_minor_table(gpu_count: int) -> list[tuple[str, int]]:
    table = [("config", 1), ("monitor", 2)]
    minor = 3
    for gpu in range(gpu_count):
        for gi in range(_GIS_PER_GPU):
            table.append((f"gpu{gpu}/gi{gi}/access", minor))
            minor += 1
            for ci in range(_CIS_PER_GI):
                table.append((f"gpu{gpu}/gi{gi}/ci{ci}/access", minor))
                minor += 1
    return table


def _free_majors(count: int) -> list[int]:
    """Char majors no real driver on this machine uses (dynamic majors are taken from 511 down;
    261 is the kernel's fixed accel major)."""
    try:
        used = set(char_majors(Path("/proc")).values()) | {NVIDIA_MAJOR, 261}
    except HardwareError:
        used = {NVIDIA_MAJOR, 261}
    return [m for m in range(508, 384, -1) if m not in used][:count]


def ensure_nvml_sim_library() -> Path:
    """Build nvml-sim if this checkout has its source but not the library yet."""
    return ensure_built(NVML_SIM_SOURCE, NVML_SIM_LIBRARY)


def init_sim_node(
    root: Path,
    topology: str = "h100x2",
    cgroup_parents: list[Path] | None = None,
    mig_enabled: bool = True,
    slice_bytes: int = 16 << 20,
) -> SimNode:
    parsed = parse_topology(topology)
    models = parsed.gpus
    root = root.resolve()
    library = ensure_nvml_sim_library()
    dcmi_library = ensure_dcmi_sim_library() if parsed.npus else None
    for sub in ("nvml", "dev/nvidia-caps", "proc/driver/nvidia-caps", "memory", "state", "cdi"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    topology_lines = ["# accelguard simulated node: gpu <index> <model> mig=<0|1>"]
    topology_lines += [f"gpu {i} {model} mig={int(mig_enabled)}" for i, model in enumerate(models)]
    wanted_files = {root / "nvml" / "topology": "\n".join(topology_lines) + "\n"}
    if parsed.npus:
        (root / "dcmi").mkdir(exist_ok=True)
        wanted_files[root / "dcmi" / "topology"] = dcmi_topology(parsed.npus)
    marker = root / "topology"
    wanted_files[marker] = topology.strip() + "\n"
    for path, wanted in wanted_files.items():
        existing = path.read_text() if path.exists() else None
        if existing is not None and existing != wanted:
            raise ValidationError(
                f"{root} already holds a simulated node with another topology; use a new --dir"
            )
    for path, wanted in wanted_files.items():
        path.write_text(wanted)

    names = ("nvidia-uvm", "nvidia-caps", *NPU_MAJOR_NAMES)
    majors = dict(zip(names, _free_majors(len(names)), strict=True))
    devices = root / "proc" / "devices"
    if devices.exists():
        # Keep the majors of an existing node: its /dev nodes and fences were made with them.
        current = char_majors(root / "proc")
        majors = {name: current.get(name, major) for name, major in majors.items()}
    npu_lines = "".join(f"{majors[n]} {n}\n" for n in NPU_MAJOR_NAMES) if parsed.npus else ""
    devices.write_text(
        "Character devices:\n  1 mem\n  4 /dev/vc/0\n  5 /dev/tty\n 10 misc\n"
        f"{NVIDIA_MAJOR} nvidia-frontend\n{majors['nvidia-uvm']} nvidia-uvm\n"
        f"{majors['nvidia-caps']} nvidia-caps\n{npu_lines}\nBlock devices:\n  8 sd\n"
    )
    table = mig_minor_table(len(models))
    (root / "proc" / "driver" / "nvidia-caps" / "mig-minors").write_text(
        "".join(f"{name} {minor}\n" for name, minor in table)
    )

    dev = root / "dev"
    make_char_node(dev / "nvidiactl", NVIDIA_MAJOR, 255)
    make_char_node(dev / "nvidia-uvm", majors["nvidia-uvm"], 0)
    make_char_node(dev / "nvidia-uvm-tools", majors["nvidia-uvm"], 1)
    for index in range(len(models)):
        make_char_node(dev / f"nvidia{index}", NVIDIA_MAJOR, index)
    for _, minor in table:
        make_char_node(dev / "nvidia-caps" / f"nvidia-cap{minor}", majors["nvidia-caps"], minor)
    if parsed.npus:
        for name, major_name, minor in npu_nodes(parsed.npus):
            make_char_node(dev / name, majors[major_name], minor)
    if parsed.accels:
        init_accel_tree(root / "sys", parsed.accels, dev)

    settings: dict[str, dict[str, object]] = {
        "node": {"id": f"sim-{root.name}", "state_dir": str(root / "state")},
        "admin": {"socket": str(root / "admin.sock")},
        "nvml": {"enabled": bool(models), "library": str(library), "sim_dir": str(root / "nvml")},
        "devices": {"dev_root": str(dev), "proc_root": str(root / "proc")},
        "inventory": {"refresh_interval_s": 30.0},
        # The sim's hotplug is driven by tests; a node without GPUs has nothing to watch.
        "hotplug": {"enabled": False},
        "tenants": {"cgroup_parents": [str(p) for p in cgroup_parents or []]},
        "sim": {"memory_dir": str(root / "memory"), "slice_bytes": slice_bytes},
        "scrub": {"backend": "simmem", "deadline_s": 60.0, "min_coverage": 1.0},
        "leases": {"evict_grace_s": 2.0, "cdi_dir": str(root / "cdi")},
        "logging": {"format": "json"},
    }
    if dcmi_library is not None:
        settings["dcmi"] = {
            "enabled": True, "library": str(dcmi_library), "sim_dir": str(root / "dcmi")
        }  # fmt: skip
    if parsed.accels:
        settings["accel"] = {"enabled": True, "sys_root": str(root / "sys")}
    config = parse_config(settings)
    config_path = root / "agent.toml"
    config_path.write_text(_header(topology) + to_toml(config))
    return SimNode(
        root=root, config_path=config_path, gpus=models, npus=parsed.npus, accels=parsed.accels
    )


def _header(topology: str) -> str:
    return f"# Simulated accelguard node ({topology}); written by `accelguard sim init`.\n\n"
