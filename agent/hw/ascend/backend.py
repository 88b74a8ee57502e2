"""Huawei Ascend backend through DCMI (libdcmi.so, or dcmi-sim on a simulated node).

The same code drives the driver's library and dcmi-sim: the config names the library by path
(empty: the driver's), and a simulated node's directory is passed in ``DCMI_SIM_DIR``, which
dcmi-sim reads at every ``dcmi_init``. Every DCMI return code is translated in ``dcmi.py``;
nothing above ``hw/`` sees one.

Ids: a chip has a card id and a device id (what most DCMI calls take), a logic id (0..n-1, the
``index`` accelguard uses) and a physical id (the N of ``/dev/davinciN``, ``DeviceInfo.minor``).
Chips are found by logic id, mapped to card and device by DCMI itself, so code never assumes the
three agree (on dcmi-sim's topologies they may not).

Invariants:

* the chip identity (``NPU-`` + the hex of its VDIE die id) is read from the chip, stable across
  restarts and the same on every node that holds the chip;
* a vNPU is created only after the backend checked the template and the chip's free capacity,
  and destroyed only when the backend found it on that chip: the destroy-every-vNPU id 0xFFFF is
  never sent;
* every mutating DCMI call is preceded by a failpoint (``layout.before_create``,
  ``layout.before_destroy``), so crash tests can stop the agent at the call;
* DCMI keeps one session per process: with ``sim_dir`` set, ``open`` points the process's
  DCMI_SIM_DIR at it. Two backends on different directories in one process must re-``open``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from ctypes import byref, c_int, c_uint, c_ulonglong
from dataclasses import dataclass

from agent.errors import GpuLostError, HardwareError, InsufficientResourcesError, NotFoundError
from agent.hw.ascend import dcmi
from agent.hw.ascend.dcmi import DcmiLibrary, check, dcmi_error
from agent.hw.ascend.planner import shortfall
from agent.hw.ascend.templates import NpuCapacity, NpuModel, VnpuTemplate, model_for
from agent.hw.model import HUAWEI, DeviceInfo, InstanceInfo
from agent.runtime import failpoints
from agent.runtime.failpoints import CrashPoint

_VERSION_LEN = 64
_MB = 1 << 20
_MAX_CARDS = 64  # card ids are 0..63 (docs/dcmi-sim.md "Ids"); the card-list buffer


@dataclass(frozen=True)
class _Chip:
    logic_id: int
    card_id: int
    device_id: int
    physical_id: int

    @property
    def where(self) -> str:
        return f"NPU {self.logic_id} (card {self.card_id}, device {self.device_id})"


@dataclass(frozen=True)
class _Vnpu:
    """One vNPU as DCMI describes it."""

    vdev_id: int
    template: str
    aicore: int
    aicpu: int
    memory_mb: int


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", errors="replace").strip()


class AscendBackend:
    """Blocking DCMI calls; the daemon runs them on its executor thread."""

    vendor = HUAWEI

    def __init__(self, library: str = "", sim_dir: str = "") -> None:
        self._library_path = library
        self._sim_dir = sim_dir
        self._dcmi: DcmiLibrary | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self) -> None:
        if self._dcmi is not None:
            return
        if self._sim_dir:
            # dcmi-sim reads its state directory at every dcmi_init.
            os.environ["DCMI_SIM_DIR"] = self._sim_dir
        library = DcmiLibrary(self._library_path)
        check(library.call("dcmi_init"), "dcmi_init", f"DCMI ({library.path})")
        self._dcmi = library

    def close(self) -> None:
        # DCMI has no shutdown call: the session ends with the process. Forget the library so
        # that a later open() initialises again.
        self._dcmi = None

    def __enter__(self) -> AscendBackend:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _library(self) -> DcmiLibrary:
        if self._dcmi is None:
            raise HardwareError("the Ascend backend is not open (DCMI not initialised)")
        return self._dcmi

    # -- chips ----------------------------------------------------------------------------------

    def driver_version(self) -> str:
        buffer = ctypes.create_string_buffer(_VERSION_LEN)
        code = self._library().call("dcmi_get_driver_version", buffer, _VERSION_LEN)
        check(code, "dcmi_get_driver_version", "DCMI")
        return _text(buffer.raw)

    def chip_count(self) -> int:
        """NPU chips on the node: the NPUs of every card DCMI lists."""
        library = self._library()
        count = c_int(0)
        cards = (c_int * _MAX_CARDS)()
        check(
            library.call("dcmi_get_card_list", byref(count), cards, _MAX_CARDS),
            "dcmi_get_card_list",
            "DCMI",
        )
        chips = 0
        for card in cards[: max(count.value, 0)]:
            in_card = c_int(0)
            code = library.call("dcmi_get_device_num_in_card", card, byref(in_card))
            check(code, "dcmi_get_device_num_in_card", f"card {card}")
            chips += max(in_card.value, 0)
        return chips

    def _chip(self, index: int) -> _Chip:
        count = self.chip_count()
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise NotFoundError(f"NPU index {index} does not exist (this node has {count})")
        return self._map_logic_id(index)

    def _chips(self) -> list[_Chip]:
        return [self._map_logic_id(index) for index in range(self.chip_count())]

    def _map_logic_id(self, index: int) -> _Chip:
        # Logic ids are 0..n-1 (docs/dcmi-sim.md "Ids"). The id mappings answer for a lost chip
        # too, so a lost chip is found here and left out later, when it does not answer itself.
        library = self._library()
        card, device, physical = c_int(-1), c_int(-1), c_uint(0)
        where = f"NPU {index}"
        code = library.call(
            "dcmi_get_card_id_device_id_from_logicid", byref(card), byref(device), index
        )
        check(code, "dcmi_get_card_id_device_id_from_logicid", where)
        code = library.call("dcmi_get_device_phyid_from_logicid", index, byref(physical))
        check(code, "dcmi_get_device_phyid_from_logicid", where)
        return _Chip(index, card.value, device.value, physical.value)

    def _chip_info(self, chip: _Chip) -> tuple[str, int]:
        """(chip name, AI Cores)."""
        info = dcmi.ChipInfo()
        code = self._library().call(
            "dcmi_get_device_chip_info", chip.card_id, chip.device_id, byref(info)
        )
        check(code, "dcmi_get_device_chip_info", chip.where)
        return _text(info.chip_name), int(info.aicore_cnt)

    def _identity(self, chip: _Chip) -> str:
        """Lowercase hex of the chip's VDIE die id: its stable identity."""
        die = dcmi.DieId()
        code = self._library().call(
            "dcmi_get_device_die_v2", chip.card_id, chip.device_id, dcmi.VDIE, byref(die)
        )
        check(code, "dcmi_get_device_die_v2", chip.where)
        return "".join(f"{word:08x}" for word in die.soc_die)

    def _hbm_mb(self, chip: _Chip) -> int:
        # HBM is the NPU's own memory; dcmi_get_memory_info describes the control CPUs' DDR on
        # the 910 and is not supported on the 910B (-8255).
        hbm = dcmi.HbmInfo()
        code = self._library().call(
            "dcmi_get_device_hbm_info", chip.card_id, chip.device_id, byref(hbm)
        )
        check(code, "dcmi_get_device_hbm_info", chip.where)
        return int(hbm.memory_size)

    def _model(self, chip: _Chip, chip_name: str) -> NpuModel:
        model = model_for(chip_name)
        if model is None:
            raise HardwareError(
                f"{chip.where} is an Ascend {chip_name}, which has no vNPU template table in "
                "accelguard (agent/hw/ascend/templates.py)"
            )
        return model

    def inventory(self) -> list[DeviceInfo]:
        """Every NPU that answers, by logic id. A lost one (DCMI_ERR_CODE_DEVICE_NOT_EXIST) is
        left out, so the rest of the node stays managed, as the NVML backend leaves out a GPU
        that fell off the bus. Any other error fails the whole read (unknown means unsafe)."""
        npus = []
        for chip in self._chips():
            with contextlib.suppress(GpuLostError):
                npus.append(self._npu(chip))
        return npus

    def npu(self, index: int) -> DeviceInfo:
        return self._npu(self._chip(index))

    def _npu(self, chip: _Chip) -> DeviceInfo:
        chip_name, aicore = self._chip_info(chip)
        identity = self._identity(chip)
        return DeviceInfo(
            index=chip.logic_id,
            uuid=f"NPU-{identity}",
            name=f"Ascend {chip_name}",
            serial="",
            pci_bus_id="",
            pci_device_id=0,
            minor=chip.physical_id,
            memory_total_bytes=self._hbm_mb(chip) * _MB,
            mig_current=None,
            mig_pending=None,
            instances=tuple(self._instances(chip, chip_name, identity)),
            vendor=HUAWEI,
            memory_units=aicore,
        )

    # -- vNPUs ----------------------------------------------------------------------------------

    def capacity(self, index: int) -> NpuCapacity:
        """What the chip's vNPUs together may take: AI Cores and HBM as the chip reports them,
        its AI CPUs as DCMI's vNPU totals report them, the rest from its model's table."""
        chip = self._chip(index)
        chip_name, aicore = self._chip_info(chip)
        return self._capacity(chip, chip_name, aicore, self._model(chip, chip_name))

    def _capacity(self, chip: _Chip, chip_name: str, aicore: int, model: NpuModel) -> NpuCapacity:
        table = model.capacity
        total = self._total_resource(chip)
        return NpuCapacity(
            model=chip_name,
            aicore=aicore,
            aicpu=int(total.computing.device_aicpu),
            memory_mb=self._hbm_mb(chip),
            max_vnpus=table.max_vnpus,
            counts_aicpu=table.counts_aicpu,
        )

    def templates(self, index: int) -> tuple[VnpuTemplate, ...]:
        chip = self._chip(index)
        chip_name, _ = self._chip_info(chip)
        return self._model(chip, chip_name).templates

    def vnpus(self, index: int) -> list[InstanceInfo]:
        chip = self._chip(index)
        chip_name, _ = self._chip_info(chip)
        return self._instances(chip, chip_name, self._identity(chip))

    def _total_resource(self, chip: _Chip) -> dcmi.SocTotalResource:
        total = dcmi.SocTotalResource()
        self._vdev_query(chip, dcmi.SUB_TOTAL_RESOURCE, total, None)
        return total

    def _vdev_query(
        self, chip: _Chip, sub_command: int, buffer: dcmi.DcmiStruct, vdev_id: int | None
    ) -> None:
        size = c_uint(ctypes.sizeof(buffer))
        code = self._library().call(
            "dcmi_get_device_info", chip.card_id, chip.device_id, dcmi.MAIN_CMD_VDEV_MNG,
            sub_command, byref(buffer), byref(size),
        )  # fmt: skip
        self._check_vnpu_call(code, "dcmi_get_device_info", chip, vdev_id)

    def _check_vnpu_call(self, code: int, function: str, chip: _Chip, vdev_id: int | None) -> None:
        """``check`` for a call that may name a vNPU: its DEVICE_NOT_EXIST is the chip's loss
        only when the chip says so (health 0xFFFFFFFF), else the vNPU's absence."""
        if code == dcmi.DCMI_OK:
            return
        if vdev_id is None or code != dcmi.DEVICE_NOT_EXIST or self._lost(chip):
            raise dcmi_error(function, code, chip.where)
        raise dcmi_error(function, code, f"{chip.where} vNPU {vdev_id}", names_vnpu=True)

    def _lost(self, chip: _Chip) -> bool:
        health = c_uint(0)
        code = self._library().call(
            "dcmi_get_device_health", chip.card_id, chip.device_id, byref(health)
        )
        return code == dcmi.DEVICE_NOT_EXIST or (
            code == dcmi.DCMI_OK and health.value == dcmi.HEALTH_DEVICE_NOT_EXIST
        )

    def _vnpu_records(self, chip: _Chip) -> list[_Vnpu]:
        total = self._total_resource(chip)
        count = min(int(total.vdev_num), dcmi.SOC_SPLIT_MAX)
        records = []
        for vdev_id in sorted(int(v) for v in total.vdev_id[:count]):
            query = dcmi.VdevQuery(vdev_id=vdev_id)
            self._vdev_query(chip, dcmi.SUB_VDEV_RESOURCE, query, vdev_id)
            computing = query.query_info.computing
            records.append(
                _Vnpu(
                    vdev_id=vdev_id,
                    template=_text(query.query_info.name),
                    aicore=round(computing.aic),
                    aicpu=int(computing.device_aicpu),
                    memory_mb=int(computing.memory_size),
                )
            )
        return records

    def _units(self, chip: _Chip, vdev_id: int) -> tuple[int, ...]:
        """The memory units the vNPU owns (dcmi-sim only; () with the driver's library)."""
        library = self._library()
        if not library.has("dcmisim_get_vdevice_units"):
            return ()
        mask, count = c_ulonglong(0), c_uint(0)
        code = library.call(
            "dcmisim_get_vdevice_units", chip.card_id, chip.device_id, vdev_id, byref(mask),
            byref(count),
        )  # fmt: skip
        self._check_vnpu_call(code, "dcmisim_get_vdevice_units", chip, vdev_id)
        return tuple(unit for unit in range(count.value) if mask.value >> unit & 1)

    def _instances(self, chip: _Chip, chip_name: str, identity: str) -> list[InstanceInfo]:
        """The chip's vNPUs. ``placement_start``/``placement_size`` are the lowest unit and the
        unit count; with the driver's library, which reports no units, 0 and the AI Cores."""
        model = model_for(chip_name)
        names = [t.name for t in model.templates] if model is not None else []
        result = []
        for record in self._vnpu_records(chip):
            units = self._units(chip, record.vdev_id)
            result.append(
                InstanceInfo(
                    uuid=f"vNPU-{identity}-{record.vdev_id}",
                    gpu_instance_id=record.vdev_id,
                    compute_instance_id=None,
                    # -1: a template the table does not know (the vNPU is still listed).
                    profile_id=names.index(record.template) if record.template in names else -1,
                    profile=record.template,
                    placement_start=min(units) if units else 0,
                    placement_size=len(units) if units else record.aicore,
                    memory_bytes=record.memory_mb * _MB,
                    units=units,
                )
            )
        return result

    def create_vnpu(self, index: int, template: str) -> InstanceInfo:
        """Create a vNPU of ``template`` with the lowest free vdev id (DCMI's automatic id)."""
        chip = self._chip(index)
        chip_name, aicore = self._chip_info(chip)
        model = self._model(chip, chip_name)
        wanted = model.template(template)
        if wanted is None:
            offered = ", ".join(t.name for t in model.templates)
            raise NotFoundError(
                f"NPU {index} (Ascend {chip_name}) has no vNPU template {template!r}; "
                f"it offers {offered}"
            )
        capacity = self._capacity(chip, chip_name, aicore, model)
        existing = self._vnpu_records(chip)
        usage = [(self._as_template(model, record, capacity), 1) for record in existing]
        reason = shortfall(capacity, [*usage, (wanted, 1)])
        if reason is not None:
            held = ", ".join(f"{r.template} ({r.vdev_id})" for r in existing) or "none"
            raise InsufficientResourcesError(
                f"NPU {index} (Ascend {chip_name}): one more {template} {reason} (its vNPUs: "
                f"{held})"
            )
        request = dcmi.CreateVdevRes(
            vdev_id=dcmi.VDEV_ID_AUTO, vfg_id=dcmi.VDEV_ID_AUTO, template_name=template.encode()
        )
        out = dcmi.CreateVdevOut()
        failpoints.hit(CrashPoint.LAYOUT_BEFORE_CREATE)
        code = self._library().call(
            "dcmi_create_vdevice", chip.card_id, chip.device_id, byref(request), byref(out)
        )
        check(code, "dcmi_create_vdevice", f"{chip.where} creating {template}")
        vdev_id = int(out.vdev_id)
        for instance in self._instances(chip, chip_name, self._identity(chip)):
            if instance.gpu_instance_id == vdev_id:
                return instance
        raise HardwareError(f"{chip.where}: vNPU {vdev_id} was created but DCMI does not list it")

    @staticmethod
    def _as_template(model: NpuModel, record: _Vnpu, capacity: NpuCapacity) -> VnpuTemplate:
        known = model.template(record.template)
        if known is not None:
            return known
        # Not in the table (a newer driver's template): count what DCMI reports for it.
        return VnpuTemplate(
            record.template, record.aicore, record.aicpu, record.memory_mb, capacity.counts_aicpu
        )

    def destroy_vnpu(self, index: int, vdev_id: int) -> None:
        """Destroy one vNPU of the chip (the driver refuses one still bound to a container)."""
        chip = self._chip(index)
        present = [record.vdev_id for record in self._vnpu_records(chip)]
        if vdev_id not in present:
            listed = ", ".join(map(str, present)) or "none"
            raise NotFoundError(f"NPU {index} has no vNPU {vdev_id} (its vNPUs: {listed})")
        failpoints.hit(CrashPoint.LAYOUT_BEFORE_DESTROY)
        code = self._library().call(
            "dcmi_set_destroy_vdevice", chip.card_id, chip.device_id, vdev_id
        )
        self._check_vnpu_call(code, "dcmi_set_destroy_vdevice", chip, vdev_id)

    # -- health ---------------------------------------------------------------------------------

    def health(self, index: int) -> tuple[int, tuple[int, ...]]:
        """(health, error codes): health 0 normal, 1 minor, 2 major, 3 critical, 0xFFFFFFFF the
        chip does not answer (then no error codes: DCMI cannot read them)."""
        chip = self._chip(index)
        library = self._library()
        health = c_uint(0)
        code = library.call("dcmi_get_device_health", chip.card_id, chip.device_id, byref(health))
        check(code, "dcmi_get_device_health", chip.where)
        if health.value == dcmi.HEALTH_DEVICE_NOT_EXIST:
            return health.value, ()
        count = c_int(0)
        codes = (c_uint * dcmi.ERROR_CODE_MAX_COUNT)()
        code = library.call(
            "dcmi_get_device_errorcode_v2", chip.card_id, chip.device_id, byref(count), codes,
            dcmi.ERROR_CODE_MAX_COUNT,
        )  # fmt: skip
        check(code, "dcmi_get_device_errorcode_v2", chip.where)
        found = min(max(count.value, 0), dcmi.ERROR_CODE_MAX_COUNT)
        return health.value, tuple(int(value) for value in codes[:found])
