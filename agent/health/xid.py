"""What an XID means for the partitions on its GPU: NVIDIA's Xid Catalog, one table, and the
rule that turns the Catalog's advice into an accelguard action (docs/health.md).

Source: NVIDIA, "Analyzing Xid Errors with the Xid Catalog",
https://docs.nvidia.com/deploy/xid-errors/analyzing-xid-catalog.html (and the Xid-Catalog.xlsx
spreadsheet it links), the revision that lists XIDs 1-172. :data:`CATALOG` holds every row whose
"Applies to H100" column is YES, with the row's mnemonic and its "Resolution Bucket (Immediate
Action)" as written there (an empty cell is :attr:`Bucket.NONE`). Rows for other GPUs only
(A100-only 93, the Blackwell NVLink5 XIDs 144-150, ...) and the rows marked Unused for every GPU
are not in the table: on this node they are unknown XIDs.

Invariants :func:`classify` keeps, whatever the table and the overrides say:

- an XID not in the table is never ignored: the GPU, or the instance NVML attributes it to, is
  quarantined (fail closed);
- ``QUARANTINE_INSTANCE`` only for an event that carries GI/CI ids (``has_instance``); without
  them there is no instance to confine it to, so the whole GPU is quarantined;
- ``reset_required`` only with ``QUARANTINE_GPU``, and only when the Catalog's immediate action
  needs the GPU reset or the node restarted: a reset takes down every instance on the GPU, so a
  fault that needs one is never confined to an instance;
- an operator override wins over the Catalog, within the rules above.

Pure functions, no I/O: the health monitor calls :func:`classify` for each XID event and acts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from agent.errors import ValidationError

# Override keys are XID numbers; the Catalog's numbers are 1-172 today. Anything larger than this
# is a typo, and bounding it keeps int() off an operator's accidental megabyte of digits.
MAX_XID: Final = 65535
OVERRIDES_SECTION: Final = "[health] xid_overrides"


class Action(StrEnum):
    """What accelguard does about an XID."""

    QUARANTINE_GPU = "quarantine_gpu"  # every partition on the GPU; see reset_required
    QUARANTINE_INSTANCE = "quarantine_instance"  # only the partition NVML attributes it to
    LEASE_EVENT = "lease_event"  # recorded against the lease using the GPU; nothing quarantined
    IGNORE = "ignore"


class Bucket(StrEnum):
    """The Catalog's "Resolution Bucket (Immediate Action)" values used by its H100 rows."""

    RESTART_APP = "RESTART_APP"
    IGNORE = "IGNORE"
    RESET_GPU = "RESET_GPU"
    RESTART_BM = "RESTART_BM"  # restart the bare-metal node
    RESTART_VM = "RESTART_VM"
    WORKFLOW_XID_45 = "WORKFLOW_XID_45"
    WORKFLOW_XID_48 = "WORKFLOW_XID_48"
    WORKFLOW_NVLINK_ERR = "WORKFLOW_NVLINK_ERR"
    CHECK_MECHANICALS = "CHECK_MECHANICALS"
    UPDATE_SWFW = "UPDATE_SWFW"
    XID_154 = "XID_154"
    CONTACT_SUPPORT = "CONTACT_SUPPORT"  # no H100 row today; the Catalog's Unused rows say it
    NONE = ""  # the Catalog leaves the cell empty


class Source(StrEnum):
    CATALOG = "catalog"
    OVERRIDE = "override"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class CatalogEntry:
    xid: int
    mnemonic: str
    immediate_action: Bucket


@dataclass(frozen=True)
class Classification:
    xid: int
    action: Action
    catalog_action: str  # the Catalog's immediate action; "" for an unknown XID or an empty cell
    mnemonic: str  # "" for an XID not in the table
    reset_required: bool  # the GPU returns to service only through a GPU reset (or node restart)
    source: Source


@dataclass(frozen=True)
class Response:
    """accelguard's answer to a Catalog bucket, for an event without GI/CI ids."""

    action: Action
    reset_required: bool


_RESET: Final = Response(Action.QUARANTINE_GPU, reset_required=True)
# Fail closed: the Catalog asks for a person (or says nothing), not for a reset. Quarantined until
# an operator clears it; confined to the instance when NVML attributes the event to one.
_INVESTIGATE: Final = Response(Action.QUARANTINE_GPU, reset_required=False)
UNKNOWN_XID_RESPONSE: Final = _INVESTIGATE

# One row per bucket; docs/health.md gives the reasons.
BUCKET_RESPONSES: Final[Mapping[Bucket, Response]] = MappingProxyType(
    {
        Bucket.RESTART_APP: Response(Action.LEASE_EVENT, reset_required=False),
        Bucket.IGNORE: Response(Action.IGNORE, reset_required=False),
        # 45 is the driver tearing down a context: Ctrl-C, SIGKILL, a GPU reset, or the fallout
        # of another XID, which is classified on its own. accelguard's own evictions log it.
        Bucket.WORKFLOW_XID_45: Response(Action.LEASE_EVENT, reset_required=False),
        Bucket.RESET_GPU: _RESET,
        Bucket.RESTART_BM: _RESET,
        # In confidential computing, restarting the VM is what resets its GPU.
        Bucket.RESTART_VM: _RESET,
        # The Catalog, for 48 and 74: "A GPU reset or node reboot is needed to clear this error."
        Bucket.WORKFLOW_XID_48: _RESET,
        Bucket.WORKFLOW_NVLINK_ERR: _RESET,
        Bucket.CHECK_MECHANICALS: _INVESTIGATE,
        Bucket.UPDATE_SWFW: _INVESTIGATE,
        # 154 names the recovery it requires in its message text, which the XID number lacks.
        Bucket.XID_154: _INVESTIGATE,
        Bucket.CONTACT_SUPPORT: _INVESTIGATE,
        Bucket.NONE: _INVESTIGATE,
    }
)

_B = Bucket
_ROWS: Final[tuple[CatalogEntry, ...]] = tuple(
    CatalogEntry(xid, mnemonic, bucket)
    for xid, mnemonic, bucket in (
        (8, "ROBUST_CHANNEL_FIFO_ERROR_IDLE_TIMEOUT", _B.RESTART_APP),
        (11, "ROBUST_CHANNEL_GR_ERROR_MISSING_HW", _B.RESTART_APP),
        (13, "ROBUST_CHANNEL_GR_EXCEPTION / ROBUST_CHANNEL_GR_ERROR_SW_NOTIFY", _B.RESTART_APP),
        (14, "ROBUST_CHANNEL_FAKE_ERROR", _B.IGNORE),
        (25, "ROBUST_CHANNEL_GR_ILLEGAL_NOTIFY", _B.RESTART_APP),
        (31, "ROBUST_CHANNEL_FIFO_ERROR_MMU_ERR_FLT", _B.RESTART_APP),
        (32, "ROBUST_CHANNEL_PBDMA_ERROR", _B.RESTART_APP),
        (37, "ROBUST_CHANNEL_FECS_ERR_UNIMP_FIRMWARE_METHOD", _B.IGNORE),
        (38, "ROBUST_CHANNEL_FECS_ERR_WATCHDOG_TIMEOUT", _B.IGNORE),
        (39, "ROBUST_CHANNEL_CE0_ERROR", _B.RESTART_APP),
        (40, "ROBUST_CHANNEL_CE1_ERROR", _B.RESTART_APP),
        (41, "ROBUST_CHANNEL_CE2_ERROR", _B.RESTART_APP),
        (43, "ROBUST_CHANNEL_RESETCHANNEL_VERIF_ERROR", _B.IGNORE),
        (44, "ROBUST_CHANNEL_GR_FAULT_DURING_CTXSW", _B.IGNORE),
        (45, "ROBUST_CHANNEL_PREEMPTIVE_REMOVAL", _B.WORKFLOW_XID_45),
        (46, "ROBUST_CHANNEL_GPU_TIMEOUT_ERROR", _B.RESET_GPU),
        (48, "ROBUST_CHANNEL_GPU_ECC_DBE", _B.WORKFLOW_XID_48),
        (54, "SILENT_RUNNING_PWR_REDUCED_CLOCKING", _B.CHECK_MECHANICALS),
        (60, "ROBUST_CHANNEL_SEC2_ERROR", _B.RESTART_APP),
        (62, "PMU_HALT_ERROR", _B.RESET_GPU),
        (63, "INFOROM_DRAM_RETIREMENT_EVENT", _B.IGNORE),
        (64, "INFOROM_DRAM_RETIREMENT_FAILURE", _B.RESET_GPU),
        (66, "ROBUST_CHANNEL_FECS_ERR_REG_ACCESS_VIOLATION", _B.IGNORE),
        (67, "ROBUST_CHANNEL_FECS_ERR_VERIF_VIOLATION", _B.IGNORE),
        (68, "ROBUST_CHANNEL_NVDEC0_ERROR", _B.RESTART_APP),
        (69, "ROBUST_CHANNEL_GR_CLASS_ERROR", _B.RESTART_APP),
        (70, "ROBUST_CHANNEL_CE3_ERROR", _B.RESTART_APP),
        (71, "ROBUST_CHANNEL_CE4_ERROR", _B.RESTART_APP),
        (72, "ROBUST_CHANNEL_CE5_ERROR", _B.RESTART_APP),
        (74, "NVLINK_ERROR", _B.WORKFLOW_NVLINK_ERR),
        (75, "ROBUST_CHANNEL_CE6_ERROR", _B.RESTART_APP),
        (76, "ROBUST_CHANNEL_CE7_ERROR", _B.RESTART_APP),
        (77, "ROBUST_CHANNEL_CE8_ERROR", _B.RESTART_APP),
        (78, "VGPU_START_ERROR", _B.UPDATE_SWFW),
        (79, "ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS", _B.RESTART_BM),
        (80, "PBDMA_PUSHBUFFER_CRC_MISMATCH", _B.RESTART_APP),
        (82, "ROBUST_CHANNEL_NVJPG0_ERROR", _B.RESTART_APP),
        (83, "ROBUST_CHANNEL_NVDEC1_ERROR", _B.RESTART_APP),
        (84, "ROBUST_CHANNEL_NVDEC2_ERROR", _B.RESTART_APP),
        (85, "ROBUST_CHANNEL_CE9_ERROR", _B.RESTART_APP),
        (86, "ROBUST_CHANNEL_OFA0_ERROR", _B.RESTART_APP),
        (88, "ROBUST_CHANNEL_NVDEC3_ERROR", _B.RESTART_APP),
        (89, "ROBUST_CHANNEL_NVDEC4_ERROR", _B.RESTART_APP),
        (92, "EXCESSIVE_SBE_INTERRUPTS", _B.IGNORE),
        (94, "ROBUST_CHANNEL_CONTAINED_ERROR", _B.RESTART_APP),
        (95, "ROBUST_CHANNEL_UNCONTAINED_ERROR", _B.RESET_GPU),
        (96, "ROBUST_CHANNEL_NVDEC5_ERROR", _B.RESTART_APP),
        (97, "ROBUST_CHANNEL_NVDEC6_ERROR", _B.RESTART_APP),
        (98, "ROBUST_CHANNEL_NVDEC7_ERROR", _B.RESTART_APP),
        (99, "ROBUST_CHANNEL_NVJPG1_ERROR", _B.RESTART_APP),
        (100, "ROBUST_CHANNEL_NVJPG2_ERROR", _B.RESTART_APP),
        (101, "ROBUST_CHANNEL_NVJPG3_ERROR", _B.RESTART_APP),
        (102, "ROBUST_CHANNEL_NVJPG4_ERROR", _B.RESTART_APP),
        (103, "ROBUST_CHANNEL_NVJPG5_ERROR", _B.RESTART_APP),
        (104, "ROBUST_CHANNEL_NVJPG6_ERROR", _B.RESTART_APP),
        (105, "ROBUST_CHANNEL_NVJPG7_ERROR", _B.RESTART_APP),
        (106, "SMBPBI_TEST_MESSAGE", _B.IGNORE),
        (107, "SMBPBI_TEST_MESSAGE_SILENT", _B.IGNORE),
        (108, "NVLINK_REMOTE_TRANSLATION_ERROR", _B.IGNORE),
        (109, "ROBUST_CHANNEL_CTXSW_TIMEOUT_ERROR", _B.RESET_GPU),
        (110, "SEC_FAULT_ERROR", _B.RESET_GPU),
        (119, "GSP_RPC_TIMEOUT", _B.RESET_GPU),
        (120, "GSP_ERROR", _B.RESET_GPU),
        (136, "ALI_TRAINING_FAIL", _B.RESET_GPU),
        (137, "NVLINK_PRIV_ERR", _B.IGNORE),
        (140, "UNRECOVERABLE_ECC_ERROR_ESCAPE", _B.RESET_GPU),
        (141, "ROBUST_CHANNEL_FAST_PATH_ERROR", _B.IGNORE),
        (143, "GPU_INIT_ERROR", _B.RESET_GPU),
        (151, "ROBUST_CHANNEL_KEY_ROTATION_ERROR", _B.RESTART_VM),
        (154, "GPU_RECOVERY_ACTION_CHANGED", _B.XID_154),
        (156, "RESOURCE_RETIREMENT_EVENT", _B.RESET_GPU),
        (157, "RESOURCE_RETIREMENT_FAILURE", _B.IGNORE),
        (158, "GPU_FATAL_TIMEOUT", _B.RESET_GPU),
        (167, "PCIE_FATAL_TIMEOUT", _B.NONE),
        (168, "REDUCED_GPU_MEMORY_CAPACITY", _B.NONE),
        (169, "SEC2_HALT_ERROR", _B.NONE),
        (171, "UNCORRECTABLE_DRAM_ERROR", _B.NONE),
        (172, "UNCORRECTABLE_SRAM_ERROR", _B.NONE),
    )
)


def _index(rows: Iterable[CatalogEntry]) -> Mapping[int, CatalogEntry]:
    table: dict[int, CatalogEntry] = {}
    for row in rows:
        if row.xid in table:
            raise ValueError(f"XID {row.xid} is in the catalog table twice")
        table[row.xid] = row
    return MappingProxyType(table)


CATALOG: Final[Mapping[int, CatalogEntry]] = _index(_ROWS)


def classify(
    xid: int, has_instance: bool, overrides: Mapping[int, Action] | None = None
) -> Classification:
    """What to do about ``xid`` on a GPU; ``has_instance``: the event carries GI/CI ids."""
    entry = CATALOG.get(xid)
    if entry is None:
        response, mnemonic, bucket, source = UNKNOWN_XID_RESPONSE, "", "", Source.UNKNOWN
    else:
        response = BUCKET_RESPONSES[entry.immediate_action]
        mnemonic, bucket, source = entry.mnemonic, entry.immediate_action.value, Source.CATALOG

    if overrides is not None and xid in overrides:
        action, source = overrides[xid], Source.OVERRIDE
    elif response.action is Action.QUARANTINE_GPU and has_instance and not response.reset_required:
        action = Action.QUARANTINE_INSTANCE
    else:
        action = response.action
    if action is Action.QUARANTINE_INSTANCE and (response.reset_required or not has_instance):
        # Not even an override confines a reset (it takes down every instance on the GPU) or an
        # event NVML attributed to no instance.
        action = Action.QUARANTINE_GPU
    return Classification(
        xid=xid,
        action=action,
        catalog_action=bucket,
        mnemonic=mnemonic,
        reset_required=action is Action.QUARANTINE_GPU and response.reset_required,
        source=source,
    )


def parse_overrides(table: Mapping[str, str]) -> dict[int, Action]:
    """``{"94": "lease_event"}`` from the config's ``[health] xid_overrides`` table.

    Raises ValidationError naming the first bad key or value; nothing is half-applied.
    """
    parsed: dict[int, Action] = {}
    values = [action.value for action in Action]
    allowed = ", ".join(repr(value) for value in values)
    for key, value in table.items():
        if not (
            isinstance(key, str)
            and key.isascii()
            and key.isdecimal()
            and len(key) <= len(str(MAX_XID))
            and not key.startswith("0")
            and int(key) <= MAX_XID
        ):
            raise ValidationError(
                f"{OVERRIDES_SECTION}: key {key!r} is not an XID; write the XID as a decimal "
                f'number from 1 to {MAX_XID} without leading zeros, e.g. "94"'
            )
        if not isinstance(value, str) or value not in values:
            raise ValidationError(
                f"{OVERRIDES_SECTION}: XID {key} = {value!r} is not an action; use one of {allowed}"
            )
        parsed[int(key)] = Action(value)
    return parsed
