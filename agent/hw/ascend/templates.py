"""vNPU templates and chip capacities of each Ascend model (docs/dcmi-sim.md, "Templates and
chips", which gives the source of every number).

DCMI has no call that lists a chip's templates: the driver keeps a table per chip model and
``npu-smi`` prints it in its help. So the table lives here, looked up by the ``chip_name`` DCMI
reports (``910A``, ``910B3``, ...). A template's memory is the chip's HBM in proportion to its AI
Cores, rounded down (``tests/npu`` checks this against the table and against dcmi-sim).

Capacity rules: on a chip, the vNPUs' AI Cores, memory and (where ``counts_aicpu``) AI CPUs add
up to at most the chip's, and at most ``max_vnpus`` exist. On the 910 AI CPUs are not counted:
MindCluster's guide allows 16 x vir02 on a 32-core chip, whose 16 AI CPUs the 14 would not hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

# Driver: VDAVINCI_MAX_VFID_NUM, vNPUs per chip.
MAX_VNPUS = 16


@dataclass(frozen=True)
class VnpuTemplate:
    """A vNPU size a chip offers, e.g. ``vir08``: 8 AI Cores, 3 AI CPUs, 8192 MB."""

    name: str
    aicore: int
    aicpu: int
    memory_mb: int
    counts_aicpu: bool  # whether its AI CPUs are reserved (a capacity) on its chip


@dataclass(frozen=True)
class NpuCapacity:
    """What a chip's vNPUs together may take."""

    model: str  # DCMI chip_name, e.g. "910B3"
    aicore: int
    aicpu: int
    memory_mb: int
    max_vnpus: int = MAX_VNPUS
    counts_aicpu: bool = False


@dataclass(frozen=True)
class NpuModel:
    capacity: NpuCapacity
    templates: tuple[VnpuTemplate, ...]

    def template(self, name: str) -> VnpuTemplate | None:
        return next((t for t in self.templates if t.name == name), None)


def _model(
    name: str, aicore: int, aicpu: int, memory_mb: int, counts_aicpu: bool,
    templates: tuple[tuple[str, int, int, int], ...],
) -> NpuModel:  # fmt: skip
    return NpuModel(
        capacity=NpuCapacity(name, aicore, aicpu, memory_mb, MAX_VNPUS, counts_aicpu),
        templates=tuple(
            VnpuTemplate(template, cores, cpus, memory, counts_aicpu)
            for template, cores, cpus, memory in templates
        ),
    )


# (template, AI Cores, AI CPUs, memory MB), in the order of docs/dcmi-sim.md.
_910_32 = (("vir02", 2, 1, 2048), ("vir04", 4, 1, 4096), ("vir08", 8, 3, 8192),
           ("vir16", 16, 7, 16384))  # fmt: skip
_910_30 = (("vir02", 2, 1, 2184), ("vir04", 4, 1, 4369), ("vir08", 8, 3, 8738),
           ("vir16", 16, 7, 17476))  # fmt: skip

MODELS: Mapping[str, NpuModel] = MappingProxyType(
    {
        "910A": _model("910A", 32, 14, 32768, False, _910_32),
        "910ProB": _model("910ProB", 30, 14, 32768, False, _910_30),
        "910B2": _model(
            "910B2", 24, 6, 65536, True,
            (("vir12_3c_32g", 12, 3, 32768), ("vir06_1c_16g", 6, 1, 16384)),
        ),
        "910B3": _model(
            "910B3", 20, 7, 65536, True,
            (("vir10_3c_32g", 10, 3, 32768), ("vir05_1c_16g", 5, 1, 16384)),
        ),
        "910B4": _model(
            "910B4", 20, 7, 32768, True,
            (("vir10_3c_16g", 10, 3, 16384), ("vir10_4c_16g_m", 10, 4, 16384),
             ("vir10_3c_16g_nm", 10, 3, 16384), ("vir05_1c_8g", 5, 1, 8192)),
        ),
    }
)  # fmt: skip


def model_for(chip_name: str) -> NpuModel | None:
    """The table of the chip DCMI calls ``chip_name`` (``910B3``; an ``Ascend`` prefix and case
    are ignored), or None for a model accelguard has no templates for."""
    key = chip_name.strip().removeprefix("Ascend").strip().lower()
    return next((model for name, model in MODELS.items() if name.lower() == key), None)
