"""Container Device Interface specs, one per lease, so runtimes inject exactly its device nodes.

containerd, CRI-O, podman and Docker read ``/var/run/cdi/*.json``; a container asks for
``accelguard.io/partition=<lease id>`` and gets the partition's nodes and nothing else. The spec is
written atomically on grant and removed on release.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from agent.errors import IsolationError
from agent.hw.devnodes import DeviceNode

CDI_KIND = "accelguard.io/partition"
CDI_VERSION = "0.6.0"


def spec_path(cdi_dir: Path, lease_id: str) -> Path:
    return cdi_dir / f"accelguard.io-partition-{lease_id}.json"


def cdi_spec(lease_id: str, nodes: Sequence[DeviceNode]) -> dict[str, object]:
    return {
        "cdiVersion": CDI_VERSION,
        "kind": CDI_KIND,
        "devices": [
            {
                "name": lease_id,
                "containerEdits": {
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
                },
            }
        ],
    }


def write_spec(cdi_dir: Path, lease_id: str, nodes: Sequence[DeviceNode]) -> Path:
    path = spec_path(cdi_dir, lease_id)
    temporary = path.with_suffix(".tmp")
    try:
        cdi_dir.mkdir(parents=True, exist_ok=True)
        # Atomic (rename) but not fsynced: the journal is the record of the lease, and start-up
        # reconciliation rewrites the spec of every live lease, so a power cut loses nothing.
        with temporary.open("w") as handle:
            json.dump(cdi_spec(lease_id, nodes), handle, indent=2, sort_keys=True)
        temporary.chmod(0o644)
        temporary.replace(path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise IsolationError(f"cannot write CDI spec {path}: {error.strerror}") from error
    return path


def remove_spec(cdi_dir: Path, lease_id: str) -> None:
    try:
        spec_path(cdi_dir, lease_id).unlink(missing_ok=True)
    except OSError as error:
        raise IsolationError(f"cannot remove CDI spec for lease {lease_id}: {error}") from error
