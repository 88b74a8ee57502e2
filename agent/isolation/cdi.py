"""Container Device Interface specs, one per lease, so a runtime gives a container its partition.

containerd, CRI-O, podman and Docker read ``/var/run/cdi/*.json``; a container asks for
``accelguard.io/partition=<lease id>`` (:func:`device_name`) and gets what CUDA needs, as
``nvidia-ctk cdi generate`` would give it, for that partition only:

- exactly the partition's device nodes (the fence allows no others);
- the driver's user-space libraries and tools, bind-mounted read-only (``driver_files``);
- a ``createContainer`` hook that rebuilds the container's linker cache over the library folders,
  only when the host has NVIDIA's hook (nvidia-cdi-hook or nvidia-ctk): a hook must be a host
  executable that works inside the container's root, and nothing else here does that. Without
  one the spec says so in an annotation; the libraries are still mounted under their SONAMEs;
- ``NVIDIA_VISIBLE_DEVICES`` and ``CUDA_VISIBLE_DEVICES`` set to the partition's UUID (MIG or GPU),
  which CUDA accepts for both.

``cdiVersion`` is the oldest version that has every field used (the rules of the
container-device-interface project's ``MinimumRequiredVersion``). The spec is written atomically
on grant, rewritten for every live lease at start-up, and removed on release.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from agent.errors import IsolationError
from agent.hw.devnodes import DeviceNode
from agent.isolation.driver_files import DriverFiles, DriverSearch, discover

CDI_KIND = "accelguard.io/partition"
# The same options nvidia-ctk gives driver files: read-only, and no setuid or device files
# through them.
MOUNT_OPTIONS = ("ro", "nosuid", "nodev", "bind")
LDCACHE_ANNOTATION = "accelguard.io/ldcache"


_SPEC_PREFIX = "accelguard.io-partition-"


def spec_path(cdi_dir: Path, lease_id: str) -> Path:
    return cdi_dir / f"{_SPEC_PREFIX}{lease_id}.json"


def device_name(lease_id: str) -> str:
    """The fully qualified CDI device name a container runtime is asked for."""
    return f"{CDI_KIND}={lease_id}"


def cdi_spec(
    lease_id: str,
    nodes: Sequence[DeviceNode],
    partition_uuid: str = "",
    driver: DriverFiles | None = None,
) -> dict[str, object]:
    edits: dict[str, object] = {
        "deviceNodes": [
            {
                "path": str(node.path),
                "type": node.kind,
                "major": node.major,
                "minor": node.minor,
                "permissions": "rw",
            }
            for node in nodes
        ]
    }
    if partition_uuid:
        edits["env"] = [
            f"NVIDIA_VISIBLE_DEVICES={partition_uuid}",
            f"CUDA_VISIBLE_DEVICES={partition_uuid}",
        ]
    device: dict[str, object] = {"name": lease_id, "containerEdits": edits}
    if driver is not None:
        files = [*driver.libraries, *driver.binaries]
        if files:
            edits["mounts"] = [
                {
                    "hostPath": str(file.host_path),
                    "containerPath": str(file.container_path),
                    "options": list(MOUNT_OPTIONS),
                }
                for file in files
            ]
        folders = driver.library_folders
        if folders and driver.ldcache_hook is not None:
            hook = driver.ldcache_hook
            edits["hooks"] = [
                {
                    "hookName": "createContainer",
                    "path": str(hook.path),
                    "args": [*hook.argv, *(a for f in folders for a in ("--folder", f))],
                }
            ]
        elif folders:
            device["annotations"] = {
                LDCACHE_ANNOTATION: (
                    "no nvidia-cdi-hook or nvidia-ctk on the host, so no hook updates the "
                    "container's linker cache; the libraries are mounted under their SONAMEs in "
                    f"{':'.join(folders)}, which the image must search (ld.so.conf or "
                    "LD_LIBRARY_PATH)"
                )
            }
    spec: dict[str, object] = {"kind": CDI_KIND, "devices": [device]}
    spec["cdiVersion"] = minimum_version(spec)
    return spec


def minimum_version(spec: dict[str, object]) -> str:
    """The oldest CDI version with every field ``spec`` uses (container-device-interface,
    pkg/cdi/version.go: annotations and a dot in the kind's class 0.6.0; a device node's hostPath
    and a device name starting with a digit 0.5.0; a mount's type 0.4.0; the rest 0.3.0)."""
    devices = [d for d in _list(spec.get("devices")) if isinstance(d, dict)]
    edits = [_dict(d.get("containerEdits")) for d in devices]
    if spec.get("annotations") or any(d.get("annotations") for d in devices):
        return "0.6.0"
    if "." in str(spec.get("kind", "")).partition("/")[2]:
        return "0.6.0"
    nodes = [n for e in edits for n in _list(e.get("deviceNodes")) if isinstance(n, dict)]
    if any("hostPath" in n for n in nodes) or any(
        str(d.get("name", "a"))[:1].isdigit() for d in devices
    ):
        return "0.5.0"
    mounts = [m for e in edits for m in _list(e.get("mounts")) if isinstance(m, dict)]
    if any("type" in m for m in mounts):
        return "0.4.0"
    return "0.3.0"


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def _dict(value: object) -> dict[str, object]:
    return value if isinstance(value, dict) else {}


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


def write_spec(
    cdi_dir: Path,
    lease_id: str,
    nodes: Sequence[DeviceNode],
    partition_uuid: str,
    driver: DriverSearch | None,
) -> Path:
    """Write the lease's spec. ``driver``: where to find the driver's files (found anew on every
    write, so a driver upgrade reaches the next grant and the next start-up); None writes device
    nodes only, which no container can run CUDA with (callers say so explicitly)."""
    path = spec_path(cdi_dir, lease_id)
    files = discover(driver) if driver is not None else None
    spec = cdi_spec(lease_id, nodes, partition_uuid, files)
    # The C encoder: with ``indent`` json takes its pure-Python one, which cost a grant 0.1 ms.
    text = json.dumps(spec, sort_keys=True).encode()
    temporary = path.with_suffix(".tmp")
    try:
        # Atomic (rename) but not fsynced: the journal is the record of the lease, and start-up
        # reconciliation rewrites the spec of every live lease, so a power cut loses nothing.
        try:
            descriptor = os.open(temporary, _CREATE, 0o644)
        except FileNotFoundError:
            cdi_dir.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(temporary, _CREATE, 0o644)
        try:
            os.fchmod(descriptor, 0o644)  # whatever the agent's umask
            while text:
                text = text[os.write(descriptor, text) :]
        finally:
            os.close(descriptor)
        temporary.replace(path)
    except OSError as error:
        # The cleanup fails too when the directory is the trouble (ENOTDIR, EROFS): the error
        # worth reporting is the first one.
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise IsolationError(f"cannot write CDI spec {path}: {error.strerror}") from error
    return path


def sweep_specs(cdi_dir: Path, live: Iterable[str]) -> list[str]:
    """Remove our specs (and half-written ones) of every lease not in ``live``: those of a
    journal that was lost, or of an agent that died between a write and its rename. Other
    vendors' specs in the directory are left alone. The names removed, sorted."""
    keep = {spec_path(cdi_dir, lease_id).name for lease_id in live}
    try:
        names = [entry.name for entry in cdi_dir.iterdir()]
    except FileNotFoundError:
        return []
    except OSError as error:
        raise IsolationError(f"cannot list CDI directory {cdi_dir}: {error.strerror}") from error
    removed = []
    for name in sorted(names):
        ours = name.startswith(_SPEC_PREFIX) and name.endswith((".json", ".tmp"))
        if ours and name not in keep:
            try:
                (cdi_dir / name).unlink(missing_ok=True)
            except OSError as error:
                raise IsolationError(
                    f"cannot remove stale CDI spec {cdi_dir / name}: {error.strerror}"
                ) from error
            removed.append(name)
    return removed


def remove_spec(cdi_dir: Path, lease_id: str) -> None:
    try:
        spec_path(cdi_dir, lease_id).unlink(missing_ok=True)
    except OSError as error:
        raise IsolationError(f"cannot remove CDI spec for lease {lease_id}: {error}") from error
