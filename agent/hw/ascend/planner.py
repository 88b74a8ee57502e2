"""Pure vNPU planner: wanted template counts on one Ascend chip -> keep, destroy, create. No I/O.

Unlike MIG there is no placement to search: the driver gives a vNPU any free AI Cores and memory,
so a layout fits a chip exactly when its totals do (docs/dcmi-sim.md, "Capacity"): AI Cores,
memory and, where the chip counts them, AI CPUs add up to at most the chip's, and at most
``max_vnpus`` exist. The planner keeps these guarantees, as the MIG planner does:

* exact: it refuses (LayoutError, one line saying why) only a layout that cannot fit the chip, and
  a plan it returns fits the chip after its destroys and creates;
* conservative: it keeps every existing vNPU the layout still wants (per template, up to the wanted
  count, pinned ones first, then the lowest vdev ids) and destroys only the rest;
* idempotent: a layout the chip already has gives an empty plan, zero DCMI calls;
* it never destroys a pinned (leased or not yet scrubbed) vNPU: a layout that would is refused.

An empty layout means no vNPUs: the NPU is used whole.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from agent.errors import LayoutError
from agent.hw.ascend.templates import NpuCapacity, VnpuTemplate
from agent.hw.model import InstanceInfo


@dataclass(frozen=True, slots=True)
class VnpuPlan:
    """How to get from the chip's vNPUs to the wanted layout: destroy, then create."""

    keep: tuple[InstanceInfo, ...]
    destroy: tuple[InstanceInfo, ...]
    create: tuple[VnpuTemplate, ...]

    @property
    def mutations(self) -> int:
        """DCMI mutating calls the plan takes (one per destroy and per create)."""
        return len(self.destroy) + len(self.create)

    @property
    def is_noop(self) -> bool:
        return self.mutations == 0


def plan_vnpus(
    capacity: NpuCapacity,
    templates: Sequence[VnpuTemplate],
    existing: Sequence[InstanceInfo],
    desired: Mapping[str, int],
    *,
    pinned: Collection[int] = (),
    label: str = "",
) -> VnpuPlan:
    """Plan the fewest destroys and creates that leave exactly ``desired`` template counts.

    ``existing`` are the chip's vNPUs (``profile`` = template, ``gpu_instance_id`` = vdev id),
    ``pinned`` vdev ids that must stay, ``label`` how messages name the chip (``NPU 0``).
    """
    where = _where(capacity, label)
    by_name = {template.name: template for template in templates}
    wanted = _resolve_desired(where, by_name, desired)
    spec = layout_text(wanted)
    reason = shortfall(capacity, [(by_name[name], count) for name, count in wanted.items()])
    if reason is not None:
        raise LayoutError(f"{where}: {spec} {reason}")

    vdev_ids = {instance.gpu_instance_id for instance in existing}
    stale = sorted(set(pinned) - vdev_ids)
    if stale:
        raise LayoutError(
            f"{where}: pinned vNPU {stale[0]} is not on the chip; re-read the chip's vNPUs"
        )
    kept: list[InstanceInfo] = []
    creations: list[VnpuTemplate] = []
    for name, count in wanted.items():
        candidates = sorted(
            (instance for instance in existing if instance.profile == name),
            key=lambda instance: (instance.gpu_instance_id not in pinned, instance.gpu_instance_id),
        )
        kept.extend(candidates[:count])
        creations.extend([by_name[name]] * max(count - len(candidates), 0))
    kept_ids = {instance.gpu_instance_id for instance in kept}
    destroy = sorted(
        (instance for instance in existing if instance.gpu_instance_id not in kept_ids),
        key=lambda instance: instance.gpu_instance_id,
    )
    blocked = [instance for instance in destroy if instance.gpu_instance_id in pinned]
    if blocked:
        first = blocked[0]
        raise LayoutError(
            f"{where}: {spec} has no room for vNPU {first.gpu_instance_id} ({first.profile}), "
            "which is pinned (leased or not yet scrubbed); release it first"
        )
    # Larger vNPUs first: the driver then finds contiguous memory for each (docs/dcmi-sim.md,
    # "Simulated memory"); the order changes nothing else.
    creations.sort(key=lambda template: (-template.aicore, template.name))
    return VnpuPlan(
        keep=tuple(sorted(kept, key=lambda instance: instance.gpu_instance_id)),
        destroy=tuple(destroy),
        create=tuple(creations),
    )


def shortfall(capacity: NpuCapacity, vnpus: Sequence[tuple[VnpuTemplate, int]]) -> str | None:
    """Why these vNPUs (template, count) together do not fit the chip, e.g. ``needs 48 AI Cores,
    the chip has 32``; None when they fit."""
    number = sum(count for _, count in vnpus)
    if number > capacity.max_vnpus:
        return f"is {number} vNPUs, the chip takes at most {capacity.max_vnpus}"
    aicore = sum(template.aicore * count for template, count in vnpus)
    if aicore > capacity.aicore:
        return f"needs {aicore} AI Cores, the chip has {capacity.aicore}"
    memory = sum(template.memory_mb * count for template, count in vnpus)
    if memory > capacity.memory_mb:
        return f"needs {memory} MB of memory, the chip has {capacity.memory_mb} MB"
    aicpu = sum(template.aicpu * count for template, count in vnpus if template.counts_aicpu)
    if capacity.counts_aicpu and aicpu > capacity.aicpu:
        return f"needs {aicpu} AI CPUs, the chip has {capacity.aicpu}"
    return None


def layout_text(counts: Mapping[str, int]) -> str:
    """``vir16=1,vir08=2`` (zero counts left out); ``no vNPUs`` for the whole NPU."""
    text = ",".join(f"{name}={count}" for name, count in counts.items() if count)
    return text or "no vNPUs"


def _where(capacity: NpuCapacity, label: str) -> str:
    chip = f"Ascend {capacity.model}"
    return f"{label} ({chip})" if label else chip


def _resolve_desired(
    where: str, by_name: Mapping[str, VnpuTemplate], desired: Mapping[str, int]
) -> dict[str, int]:
    wanted: dict[str, int] = {}
    for name, count in desired.items():
        if name not in by_name:
            offered = ", ".join(by_name) or "none"
            raise LayoutError(
                f"{where}: unknown vNPU template {name!r}; this chip offers {offered}"
            )
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise LayoutError(
                f"{where}: the count of {name} must be a non-negative integer, not {count!r}"
            )
        if count:
            wanted[name] = count
    return wanted
