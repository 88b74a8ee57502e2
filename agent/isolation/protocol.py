"""The device fence boundary: what the lease code may ask of cgroup v1 and cgroup v2 alike.

A fence makes a tenant's cgroup able to open exactly ``baseline_rules()`` plus the partition's
rules. Both backends (cgroup_v1.CgroupV1Fence, cgroup_v2.CgroupV2Fence) are stateless: they read
what is in place from the kernel each time, so a restarted daemon needs no memory of its own to
find and replace its fence.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from agent.errors import ValidationError
from agent.isolation.rules import DeviceRule, baseline_rules, normalise

Mechanism = Literal["cgroup-v1-devices", "cgroup-v2-bpf"]

# A partition has a handful of nodes (nvidiactl, uvm, uvm-tools, nvidiaN, two caps); a thousand
# rules is a bug upstream, and would make a v2 program of ~8000 instructions.
MAX_PARTITION_RULES = 1024


@dataclass(frozen=True)
class FenceState:
    """What accelguard has in place on one cgroup, read back from the kernel.

    ``allowed`` is every rule the fence grants, baseline included, normalised; None when a fence
    of ours is present but its rules cannot be read back (several of our programs attached, or a
    program the kernel will not dump): reconcile such a cgroup by applying again.
    """

    mechanism: Mechanism
    allowed: tuple[DeviceRule, ...] | None
    program_ids: tuple[int, ...] = ()

    def grants_exactly(self, rules: Sequence[DeviceRule]) -> bool:
        """True when the fence allows exactly the baseline plus ``rules``."""
        return self.allowed is not None and self.allowed == normalise([*baseline_rules(), *rules])


class DeviceFence(Protocol):
    """A device-access fence on one kind of cgroup hierarchy."""

    mechanism: Mechanism

    def apply(self, cgroup: Path, rules: Sequence[DeviceRule]) -> None:
        """Let ``cgroup`` open exactly the baseline plus ``rules``.

        Raises ValidationError for rules a fence never grants (nothing changed), IsolationError
        when the kernel refused; then the cgroup is at least as restricted as before.
        """

    def revoke(self, cgroup: Path) -> None:
        """Leave ``cgroup`` able to open the baseline only."""

    def current(self, cgroup: Path) -> FenceState | None:
        """What accelguard has in place on ``cgroup``; None when there is no fence."""

    def remove(self, cgroup: Path) -> None:
        """Take away what accelguard put in place, and nothing else."""


def fenced_rules(rules: Sequence[DeviceRule]) -> tuple[DeviceRule, ...]:
    """The complete allow-list for a partition's rules: baseline plus rules, normalised.

    A partition's rules must each name one device (kind c or b, numeric major and minor):
    wildcards would hand a tenant other tenants' GPUs (``c 195:*``) or every device
    (``a *:*``), so they are rejected before anything touches the kernel. Only the baseline
    carries a wildcard (``c 136:*``, pty slaves).
    """
    if isinstance(rules, (str, bytes)):
        raise ValidationError("device rules must be a sequence of DeviceRule, not text")
    try:
        rules = tuple(rules)
    except TypeError:
        raise ValidationError(
            f"device rules must be a sequence of DeviceRule, got {type(rules).__name__}"
        ) from None
    if len(rules) > MAX_PARTITION_RULES:
        raise ValidationError(
            f"{len(rules)} device rules for one partition is more than {MAX_PARTITION_RULES}"
        )
    for rule in rules:
        if not isinstance(rule, DeviceRule):
            raise ValidationError(f"expected a DeviceRule, got {type(rule).__name__}")
    return _with_baseline(rules)


@functools.lru_cache(maxsize=256)
def _with_baseline(rules: tuple[DeviceRule, ...]) -> tuple[DeviceRule, ...]:
    """fenced_rules' checks and normalisation, kept per rule set (errors are not kept)."""
    for rule in rules:
        if not rule.is_single_device:
            raise ValidationError(
                f"device rule {rule} is a wildcard: a partition's rules must each name one "
                "device (c or b, numeric major:minor)"
            )
    return normalise([*baseline_rules(), *rules])
