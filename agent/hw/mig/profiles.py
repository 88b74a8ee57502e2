"""Reference MIG geometries of the GPUs accelguard supports, for tests, docs and nvml-sim.

At runtime the NVML backend builds each GPU's geometry from NVML itself
(nvmlDeviceGetGpuInstanceProfileInfo + nvmlDeviceGetGpuInstancePossiblePlacements); these tables
must agree with what real hardware reports.

Source: NVIDIA Multi-Instance GPU User Guide, "Supported MIG Profiles" (A100 and H100 tables) and
the `nvidia-smi mig -lgip` / `-lgipp` listings shown there
(https://docs.nvidia.com/datacenter/tesla/mig-user-guide/). All three GPUs have 8 memory slices
and 7 compute slices; the profile ids and placements are the same, only the names (memory sizes)
differ, and the A100-80GB uses the H100-80GB names.
"""

from __future__ import annotations

from agent.hw.mig.geometry import GiProfile, GpuGeometry

MEMORY_SLICES = 8
COMPUTE_SLICES = 7


def _geometry(model: str, names: dict[int, str]) -> GpuGeometry:
    # (profile id, compute slices, memory slices per instance, placement starts, max instances)
    layout = (
        (19, 1, 1, tuple(range(7)), 7),
        # "+me" adds the GPU's media engines (NVDEC, NVJPG, OFA); there is one set of them.
        (20, 1, 1, tuple(range(7)), 1),
        (15, 1, 2, (0, 2, 4, 6), 4),
        (14, 2, 2, (0, 2, 4), 3),
        (9, 3, 4, (0, 4), 2),
        (5, 4, 4, (0,), 1),
        (0, 7, 8, (0,), 1),
    )
    return GpuGeometry(
        model=model,
        compute_slices=COMPUTE_SLICES,
        memory_slices=MEMORY_SLICES,
        profiles=tuple(
            GiProfile(
                profile_id=profile_id,
                name=names[profile_id],
                compute_slices=compute,
                memory_slices=memory,
                starts=starts,
                max_instances=max_instances,
            )
            for profile_id, compute, memory, starts, max_instances in layout
        ),
    )


_NAMES_80GB = {
    19: "1g.10gb",
    20: "1g.10gb+me",
    15: "1g.20gb",
    14: "2g.20gb",
    9: "3g.40gb",
    5: "4g.40gb",
    0: "7g.80gb",
}
_NAMES_40GB = {
    19: "1g.5gb",
    20: "1g.5gb+me",
    15: "1g.10gb",
    14: "2g.10gb",
    9: "3g.20gb",
    5: "4g.20gb",
    0: "7g.40gb",
}

H100_80GB = _geometry("H100-80GB", _NAMES_80GB)
A100_80GB = _geometry("A100-80GB", _NAMES_80GB)
A100_40GB = _geometry("A100-40GB", _NAMES_40GB)

REFERENCE_GEOMETRIES: dict[str, GpuGeometry] = {
    geometry.model: geometry for geometry in (H100_80GB, A100_40GB, A100_80GB)
}
