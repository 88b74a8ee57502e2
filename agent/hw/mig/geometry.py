"""The MIG geometry of a GPU model, as NVML describes it: GPU-instance profiles with their slices
and placements, existing instances, and placements to create. Plain values shared by the NVML
backend, the reference profile tables and the planner (which consumes them; nothing here plans).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.errors import LayoutError

# No GPU has a million MIG instances; the bound keeps absurd counts (YAML allows integers too
# long for str()) out of arithmetic and messages.
MAX_COUNT = 999_999
_PROFILE_ID_PATTERN = re.compile(r"[0-9]+")
# NVML reports profile names as "MIG 3g.40gb"; operators write "3g.40gb".
_NVML_NAME_PREFIX = "mig "


@dataclass(frozen=True, slots=True)
class GiProfile:
    """A GPU-instance profile as NVML describes it (nvmlGpuInstanceProfileInfo_t + placements)."""

    profile_id: int
    name: str
    compute_slices: int
    memory_slices: int
    starts: tuple[int, ...]
    max_instances: int


@dataclass(frozen=True, slots=True)
class GpuGeometry:
    """What one GPU model offers: its slice counts and the GI profiles it supports."""

    model: str
    compute_slices: int
    memory_slices: int
    profiles: tuple[GiProfile, ...]

    def __post_init__(self) -> None:
        problem = _geometry_problem(self)
        if problem is not None:
            raise LayoutError(f"invalid MIG geometry for {self.model}: {problem}")

    def profile(self, name_or_id: int | str) -> GiProfile:
        """Look a profile up by name ("3g.40gb", "MIG 3g.40gb") or by profile id (9 or "9")."""
        wanted_id: int | None = None
        wanted_name: str | None = None
        if isinstance(name_or_id, int) and not isinstance(name_or_id, bool):
            wanted_id = name_or_id
        elif isinstance(name_or_id, str):
            text = name_or_id.strip()
            if _PROFILE_ID_PATTERN.fullmatch(text):
                wanted_id = int(text)
            else:
                wanted_name = text.lower()
                if wanted_name.startswith(_NVML_NAME_PREFIX):
                    wanted_name = wanted_name[len(_NVML_NAME_PREFIX) :].strip()
        for profile in self.profiles:
            if profile.profile_id == wanted_id or profile.name.lower() == wanted_name:
                return profile
        valid = ", ".join(f"{p.name} (id {p.profile_id})" for p in self.profiles)
        raise LayoutError(
            f"unknown MIG profile {show_value(name_or_id)} on {self.model}; valid profiles: {valid}"
        )


@dataclass(frozen=True, slots=True)
class Instance:
    """An existing GPU instance: its id on the GPU and where it sits."""

    gi_id: int
    profile_id: int
    start: int
    size: int


@dataclass(frozen=True, slots=True)
class Placement:
    """A GPU instance to create (nvmlDeviceCreateGpuInstanceWithPlacement)."""

    profile_id: int
    start: int
    size: int


def _geometry_problem(geometry: GpuGeometry) -> str | None:
    if not is_int(geometry.compute_slices) or geometry.compute_slices < 1:
        return f"compute_slices must be a positive integer, not {geometry.compute_slices!r}"
    if not is_int(geometry.memory_slices) or geometry.memory_slices < 1:
        return f"memory_slices must be a positive integer, not {geometry.memory_slices!r}"
    seen_ids: set[int] = set()
    seen_names: set[str] = set()
    for profile in geometry.profiles:
        label = f"profile {profile.name!r} (id {profile.profile_id!r})"
        if not is_int(profile.profile_id) or profile.profile_id < 0:
            return f"{label}: the profile id must be a non-negative integer"
        if not isinstance(profile.name, str) or not profile.name.strip():
            return f"{label}: the name is empty"
        if _PROFILE_ID_PATTERN.fullmatch(profile.name.strip()):
            return f"{label}: a name made of digits would be mistaken for a profile id"
        if profile.profile_id in seen_ids or profile.name.lower() in seen_names:
            return f"{label}: listed twice"
        seen_ids.add(profile.profile_id)
        seen_names.add(profile.name.lower())
        if not is_int(profile.compute_slices) or profile.compute_slices < 1:
            return f"{label}: compute_slices must be a positive integer"
        if not is_int(profile.memory_slices) or profile.memory_slices < 1:
            return f"{label}: memory_slices must be a positive integer"
        if not is_int(profile.max_instances) or profile.max_instances < 0:
            return f"{label}: max_instances must be a non-negative integer"
        if len(set(profile.starts)) != len(profile.starts):
            return f"{label}: a placement start is listed twice"
        for start in profile.starts:
            if (
                not is_int(start)
                or start < 0
                or start + profile.memory_slices > (geometry.memory_slices)
            ):
                return (
                    f"{label}: placement start {start!r} of size {profile.memory_slices} does "
                    f"not fit in {geometry.memory_slices} memory slices"
                )
    return None


def show_value(value: object) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) <= MAX_COUNT else "too large"
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
