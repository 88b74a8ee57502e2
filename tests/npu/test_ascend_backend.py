"""The Ascend backend against dcmi-sim: inventory, vNPU create/destroy, units, capacity, health.

Expected values come from outside the backend: the raw DCMI bindings of ``tests/dcmisim``
(die ids, unit masks, vNPU ids), dcmi-sim's ``counters`` file (mutating calls) and the
documented chip figures (docs/dcmi-sim.md).
"""

from __future__ import annotations

import ctypes

import pytest

from agent.errors import InsufficientResourcesError, NotFoundError
from agent.hw.ascend.templates import MODELS
from agent.hw.model import HUAWEI, DeviceInfo
from tests.dcmisim import dcmi
from tests.dcmisim.dcmi import DCMI_OK, NOT_SUPPORT, VDIE, topology
from tests.npu.conftest import MakeNpuNode, NpuNode

MB = 1 << 20


def die_hex(lib: ctypes.CDLL, card: int) -> str:
    die = dcmi.DieId()
    assert lib.dcmi_get_device_die_v2(card, 0, VDIE, ctypes.byref(die)) == DCMI_OK
    return "".join(f"{word:08x}" for word in die.soc_die)


def unit_tuple(lib: ctypes.CDLL, card: int, vdev_id: int) -> tuple[int, ...]:
    code, mask, count = dcmi.units(lib, card, vdev_id)
    assert code == DCMI_OK
    return tuple(unit for unit in range(count) if mask >> unit & 1)


@pytest.mark.parametrize(
    ("fixture", "model", "aicore", "hbm_mb"),
    [("node910", "910A", 32, 32768), ("node910b", "910B3", 20, 65536)],
)
def test_inventory_of_eight_npus(
    request: pytest.FixtureRequest, fixture: str, model: str, aicore: int, hbm_mb: int
) -> None:
    node: NpuNode = request.getfixturevalue(fixture)
    devices = node.backend.inventory()
    assert [device.index for device in devices] == list(range(8))
    for device in devices:
        assert device == DeviceInfo(
            index=device.index,
            uuid="NPU-" + die_hex(node.sim.lib, device.index),
            name=f"Ascend {model}",
            serial="",
            pci_bus_id="",
            pci_device_id=0,
            minor=device.index,
            memory_total_bytes=hbm_mb * MB,
            mig_current=None,
            mig_pending=None,
            instances=(),
            vendor=HUAWEI,
            memory_units=aicore,
        )
        assert (device.kind, device.label) == ("npu", f"NPU {device.index}")
        assert len(device.uuid) == len("NPU-") + 40
    assert len({device.uuid for device in devices}) == 8
    assert node.backend.driver_version() == "24.1.0"
    assert node.backend.chip_count() == 8


def test_the_910b_memory_is_its_hbm_where_memory_info_is_not_supported(node910b: NpuNode) -> None:
    lib = node910b.sim.lib
    assert lib.dcmi_get_memory_info(0, 0, ctypes.byref(dcmi.MemoryInfo())) == NOT_SUPPORT
    assert node910b.backend.npu(0).memory_total_bytes == 65536 * MB


def test_chip_identity_is_stable_across_nodes_and_restarts(make_npu_node: MakeNpuNode) -> None:
    first = make_npu_node(topology("910B3", 4))
    before = [device.uuid for device in first.backend.inventory()]
    second = make_npu_node(topology("910B3", 4))
    assert [device.uuid for device in second.backend.inventory()] == before
    first.activate()
    assert [device.uuid for device in first.backend.inventory()] == before


def test_one_session_per_process_a_backend_reopens_to_switch_nodes(
    make_npu_node: MakeNpuNode,
) -> None:
    a910 = make_npu_node(topology("910A", 2))
    b910 = make_npu_node(topology("910B3", 3))
    # DCMI_SIM_DIR now names the second node: the first backend reads it until reopened.
    assert [d.name for d in a910.backend.inventory()] == ["Ascend 910B3"] * 3
    a910.activate()
    assert [d.name for d in a910.backend.inventory()] == ["Ascend 910A"] * 2
    b910.activate()
    assert len(b910.backend.inventory()) == 3


def test_indexes_are_logic_ids_and_minors_physical_ids(make_npu_node: MakeNpuNode) -> None:
    node = make_npu_node(
        "npu 0 910B3 card=3 phy=5\nnpu 1 910A card=0 phy=2\nnpu 2 910B4 card=7 phy=0\n"
    )
    backend, lib = node.backend, node.sim.lib
    devices = backend.inventory()
    assert [(d.index, d.name, d.minor) for d in devices] == [
        (0, "Ascend 910B3", 5),
        (1, "Ascend 910A", 2),
        (2, "Ascend 910B4", 0),
    ]
    assert [d.uuid for d in devices] == [f"NPU-{die_hex(lib, card)}" for card in (3, 0, 7)]
    # vdev ids follow the physical id (100 + 16 * phy + k) and the call reaches the right card.
    created = backend.create_vnpu(0, "vir05_1c_16g")
    assert created.gpu_instance_id == 180
    assert dcmi.vnpu_ids(lib, 3) == [180]
    assert backend.create_vnpu(1, "vir04").gpu_instance_id == 132
    assert dcmi.vnpu_ids(lib, 0) == [132]
    assert backend.create_vnpu(2, "vir05_1c_8g").gpu_instance_id == 100
    assert dcmi.vnpu_ids(lib, 7) == [100]
    assert [len(d.instances) for d in backend.inventory()] == [1, 1, 1]


def test_create_and_destroy_through_the_backend(node910: NpuNode) -> None:
    backend, lib = node910.backend, node910.sim.lib
    chip = "NPU-" + die_hex(lib, 4)
    created = [backend.create_vnpu(4, name) for name in ("vir08", "vir08", "vir16")]
    assert node910.counter() == 3
    assert [v.gpu_instance_id for v in created] == [164, 165, 166]
    assert [v.profile for v in created] == ["vir08", "vir08", "vir16"]
    assert [v.profile_id for v in created] == [2, 2, 3]  # positions in the 910A template list
    assert [v.memory_bytes for v in created] == [8192 * MB, 8192 * MB, 16384 * MB]
    for vnpu in created:
        assert vnpu.uuid == f"{chip.replace('NPU-', 'vNPU-')}-{vnpu.gpu_instance_id}"
        assert vnpu.compute_instance_id is None
        assert vnpu.units == unit_tuple(lib, 4, vnpu.gpu_instance_id)
        assert (vnpu.placement_start, vnpu.placement_size) == (min(vnpu.units), len(vnpu.units))
        assert vnpu.memory_units == vnpu.units
    assert [len(v.units) for v in created] == [8, 8, 16]
    assert sorted(u for v in created for u in v.units) == list(range(32))
    assert backend.vnpus(4) == created
    assert backend.inventory()[4].instances == tuple(created)
    assert all(not d.instances for d in backend.inventory() if d.index != 4)

    backend.destroy_vnpu(4, 165)
    assert node910.counter() == 4
    assert dcmi.vnpu_ids(lib, 4) == [164, 166]
    assert [v.gpu_instance_id for v in backend.vnpus(4)] == [164, 166]
    # The freed id and memory are reused, as on hardware.
    again = backend.create_vnpu(4, "vir04")
    assert again.gpu_instance_id == 165
    assert set(again.units) < set(created[1].units)
    assert node910.counter() == 5


def test_the_backend_refuses_a_create_that_does_not_fit_without_calling_dcmi(
    node910: NpuNode,
) -> None:
    backend = node910.backend
    backend.create_vnpu(0, "vir16")
    backend.create_vnpu(0, "vir16")
    with pytest.raises(InsufficientResourcesError) as caught:
        backend.create_vnpu(0, "vir02")
    assert str(caught.value) == (
        "NPU 0 (Ascend 910A): one more vir02 needs 34 AI Cores, the chip has 32 "
        "(its vNPUs: vir16 (100), vir16 (101))"
    )
    assert node910.counter() == 2


def test_ai_cpus_are_a_capacity_on_the_910b(make_npu_node: MakeNpuNode) -> None:
    node = make_npu_node(topology("910B4", 2))
    node.backend.create_vnpu(0, "vir10_4c_16g_m")
    with pytest.raises(InsufficientResourcesError, match="needs 8 AI CPUs, the chip has 7"):
        node.backend.create_vnpu(0, "vir10_4c_16g_m")
    assert node.counter() == 1
    # dcmi-sim agrees: the same create, sent directly, is refused.
    assert dcmi.create(node.sim.lib, 0, b"vir10_4c_16g_m")[0] == dcmi.INVALID_PARAMETER


def test_names_are_checked_before_any_dcmi_mutation(node910: NpuNode) -> None:
    backend = node910.backend
    backend.create_vnpu(1, "vir08")
    offered = r"it offers vir02, vir04, vir08, vir16$"
    with pytest.raises(NotFoundError, match=r"^NPU 1 \(Ascend 910A\) has no vNPU template "
                                            r"'vir10_3c_32g'; " + offered):  # fmt: skip
        backend.create_vnpu(1, "vir10_3c_32g")
    with pytest.raises(NotFoundError, match=r"^NPU index 8 does not exist \(this node has 8\)$"):
        backend.create_vnpu(8, "vir08")
    with pytest.raises(NotFoundError, match=r"^NPU 1 has no vNPU 100 \(its vNPUs: 116\)$"):
        backend.destroy_vnpu(1, 100)
    # 0xFFFF would destroy every vNPU of the chip: it is not a vNPU, so it is refused.
    with pytest.raises(NotFoundError, match="has no vNPU 65535"):
        backend.destroy_vnpu(1, dcmi.VDEV_ID_ALL)
    with pytest.raises(NotFoundError):
        backend.vnpus(-1)
    assert node910.counter() == 1
    assert dcmi.vnpu_ids(node910.sim.lib, 1) == [116]


def test_every_model_matches_its_table_and_dcmi_sim(make_npu_node: MakeNpuNode) -> None:
    models = ["910A", "910ProB", "910B2", "910B3", "910B4"]
    node = make_npu_node("".join(f"npu {i} {model}\n" for i, model in enumerate(models)))
    backend, lib = node.backend, node.sim.lib
    for index, model in enumerate(models):
        table = MODELS[model]
        assert backend.capacity(index) == table.capacity
        assert backend.templates(index) == table.templates
        for position, template in enumerate(table.templates):
            created = backend.create_vnpu(index, template.name)
            # The table's memory is the chip's HBM in proportion to its AI Cores, rounded down.
            share = table.capacity.memory_mb * template.aicore // table.capacity.aicore
            assert template.memory_mb == share
            assert created.memory_bytes == template.memory_mb * MB
            assert created.placement_size == len(created.units) == template.aicore
            assert created.profile_id == position
            code, answer = dcmi.query(lib, index, created.gpu_instance_id)
            assert code == DCMI_OK
            assert answer.query_info.computing.device_aicpu == template.aicpu
            backend.destroy_vnpu(index, created.gpu_instance_id)
        assert backend.vnpus(index) == []


def test_health_and_error_codes(node910b: NpuNode) -> None:
    node910b.sim.append_health("2 health 2", "2 error 0x80E01801", "2 error 0x80CB8009")
    node910b.sim.append_health("5 health 1")
    backend = node910b.backend
    assert backend.health(2) == (2, (0x80E01801, 0x80CB8009))
    assert backend.health(5) == (1, ())
    assert backend.health(0) == (0, ())
    node910b.sim.append_health("2 error clear", "2 health 0")
    assert backend.health(2) == (0, ())
