"""gres.conf for Slurm from the node's current layout, and reading it back (docs/slurm.md).

One ``Name=gpu`` record per partition, in the order Slurm numbers them (``SLURM_JOB_GPUS`` are
indices into the node's records): GPUs by index, a MIG GPU's instances by placement. A MIG
instance is ``MultipleFiles=`` its parent ``/dev/nvidiaN`` and its two capability nodes, as
Slurm's MIG support expects; a whole GPU is ``File=/dev/nvidiaN``. The control and UVM nodes are
every GPU job's and are not listed. The Prolog reads the records back and maps each index to the
partition whose nodes they name, so the two never disagree silently: a record that names no
partition of the node (a layout changed without a new gres.conf) fails the job's Prolog.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import ValidationError
from agent.hw.devnodes import SHARED_NODE_NAMES

_MAX_GRES_CONF = 1 << 20
_WORD = re.compile(r"(\w+)=(\S+)")


@dataclass(frozen=True)
class GresRecord:
    node: str
    type: str
    files: tuple[str, ...]
    partition_uuid: str = ""

    def line(self) -> str:
        files = ",".join(self.files)
        key = "MultipleFiles" if len(self.files) > 1 else "File"
        return f"NodeName={self.node} Name=gpu Type={self.type} {key}={files}"


def _type_of(partition: Any, models: dict[int, str]) -> str:
    if partition.profile:
        return str(partition.profile)
    model = models.get(int(partition.gpu_index), "gpu")
    return re.sub(r"[^a-z0-9.-]", "", model.lower()) or "gpu"


def gres_records(status: Any, node: str) -> list[GresRecord]:
    """The node's GPU partitions as gres records, in Slurm's index order."""
    partitions = {p.uuid: p for p in status.partitions if p.kind in ("gpu", "mig")}
    models = {int(g.index): str(g.name) for g in status.gpus if g.vendor in ("", "nvidia")}
    records = []
    for gpu in sorted(status.gpus, key=lambda g: int(g.index)):
        if gpu.vendor not in ("", "nvidia"):
            continue
        if gpu.uuid in partitions:
            chosen = [partitions[gpu.uuid]]
        else:
            ordered = sorted(gpu.instances, key=lambda i: (i.placement_start, i.gpu_instance_id))
            chosen = [partitions[i.uuid] for i in ordered if i.uuid in partitions]
        for partition in chosen:
            files = tuple(
                n for n in partition.device_nodes if Path(n).name not in SHARED_NODE_NAMES
            )
            records.append(GresRecord(node, _type_of(partition, models), files, partition.uuid))
    return records


def gres_conf_text(records: list[GresRecord], node_id: str) -> str:
    counts: dict[str, int] = {}
    for record in records:
        counts[record.type] = counts.get(record.type, 0) + 1
    gres = ",".join(f"gpu:{name}:{count}" for name, count in counts.items())
    lines = [
        "# gres.conf for Slurm, written by `accelguard slurm gres-conf` from the layout of",
        f"# accelguard node {node_id}. Write it again after every layout change.",
        f"# slurm.conf: NodeName={records[0].node if records else '...'} Gres={gres or 'none'}",
        "AutoDetect=off",
        *(record.line() for record in records),
    ]
    return "\n".join(lines) + "\n"


def read_gres_conf(path: Path, node: str) -> list[GresRecord]:
    """The ``Name=gpu`` records of ``node`` in ``path``, in order (Slurm's GPU indices)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_GRES_CONF + 1)
    except OSError as error:
        raise ValidationError(f"cannot read gres.conf {path}: {error.strerror}") from error
    if len(data) > _MAX_GRES_CONF:
        raise ValidationError(f"gres.conf {path} is over {_MAX_GRES_CONF} bytes")
    records = []
    for raw in data.decode("utf-8", errors="replace").splitlines():
        text = raw.split("#", 1)[0].strip()
        fields = {key.lower(): value for key, value in _WORD.findall(text)}
        if fields.get("name") != "gpu":
            continue
        names = fields.get("nodename", node)
        if any(mark in names for mark in "[],"):
            # A hostlist could hold this node: skipping it would shift every index after it.
            raise ValidationError(
                f"gres.conf {path}: NodeName={names} is a host list, which accelguard does not "
                "expand; write one record per node (`accelguard slurm gres-conf`)"
            )
        if names != node:
            continue
        files = fields.get("multiplefiles") or fields.get("file") or ""
        records.append(GresRecord(node, fields.get("type", ""), tuple(files.split(","))))
    return records


def partition_for(record: GresRecord, status: Any) -> str:
    """The partition whose own nodes are exactly the record's files."""
    wanted = set(record.files)
    for partition in status.partitions:
        own = {n for n in partition.device_nodes if Path(n).name not in SHARED_NODE_NAMES}
        if own and own == wanted:
            return str(partition.uuid)
    raise ValidationError(
        f"gres record {record.line()!r} names no partition of this node: the layout changed "
        "since gres.conf was written (`accelguard slurm gres-conf`)"
    )
