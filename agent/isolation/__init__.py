"""Isolation: a tenant's cgroup may open exactly its partitions' device nodes, nothing else.

The boundary is ``fence_for(cgroup)``, which picks the backend for the hierarchy the cgroup lives
on; both backends implement ``protocol.DeviceFence`` and read what is in place back from the
kernel. Around them: ``rules`` (the device-rule model), ``cgroups`` (mounts, tenant-path
validation), ``bpf`` (the bpf(2) syscalls), ``cdi`` (container device specs), ``evict`` (finding
and removing holders) and ``survey`` (every fence on the node, read back).
"""

from __future__ import annotations

from pathlib import Path

from agent.errors import IsolationError
from agent.isolation.cgroup_v1 import CgroupV1Fence
from agent.isolation.cgroup_v2 import CgroupV2Fence
from agent.isolation.cgroups import cgroup_hierarchy
from agent.isolation.protocol import DeviceFence


def fence_for(cgroup: Path) -> DeviceFence:
    """The fence for the hierarchy ``cgroup`` lives on, detected from /proc/self/mountinfo."""
    hierarchy = cgroup_hierarchy(Path(cgroup))
    if hierarchy == "v2":
        return CgroupV2Fence()
    if hierarchy == "v1-devices":
        return CgroupV1Fence()
    raise IsolationError(
        f"{cgroup} is on neither a cgroup v2 mount nor a cgroup v1 devices mount: "
        "it cannot be fenced (validate it with resolve_tenant_cgroup first)"
    )
