"""vNPU layouts planned by the planner and applied through the backend on dcmi-sim.

The independent answer is dcmi-sim itself: a layout the planner refuses must be one dcmi-sim
refuses to build on an empty chip of the same model, and one it accepts must build. Applied, a
plan leaves exactly the wanted template counts, makes exactly ``plan.mutations`` DCMI mutating
calls (dcmi-sim's counter), and re-applying it makes none.
"""

from __future__ import annotations

import ctypes
from collections import Counter

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent.errors import LayoutError
from agent.hw.ascend.backend import AscendBackend
from agent.hw.ascend.planner import VnpuPlan, plan_vnpus
from agent.hw.ascend.templates import MODELS
from tests.dcmisim import dcmi
from tests.dcmisim.dcmi import DCMI_OK, VDEV_ID_ALL
from tests.npu.conftest import MakeNpuNode, NpuNode

MODEL_NAMES = list(MODELS)
# Chip i (i < 5) is the target of model MODEL_NAMES[i]; chip i + 5 is its scratch chip.
TOPOLOGY = "".join(
    f"npu {index} {MODEL_NAMES[index % len(MODEL_NAMES)]}\n" for index in range(2 * len(MODELS))
)


def plan(backend: AscendBackend, index: int, desired: dict[str, int]) -> VnpuPlan:
    return plan_vnpus(
        backend.capacity(index), backend.templates(index), backend.vnpus(index), desired,
        label=f"NPU {index}",
    )  # fmt: skip


def apply(backend: AscendBackend, index: int, layout: VnpuPlan) -> None:
    for vnpu in layout.destroy:
        backend.destroy_vnpu(index, vnpu.gpu_instance_id)
    for template in layout.create:
        backend.create_vnpu(index, template.name)


def builds_on_an_empty_chip(lib: ctypes.CDLL, card: int, desired: dict[str, int]) -> bool:
    """dcmi-sim's own verdict: destroy everything on the scratch chip, create the layout."""
    assert dcmi.destroy(lib, card, VDEV_ID_ALL) == DCMI_OK
    for name, count in desired.items():
        for _ in range(count):
            code, _ = dcmi.create(lib, card, name.encode())
            if code != DCMI_OK:
                assert code == dcmi.INVALID_PARAMETER
                return False
    return True


@pytest.fixture
def node(make_npu_node: MakeNpuNode) -> NpuNode:
    return make_npu_node(TOPOLOGY)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_planned_layouts_apply_exactly_and_reapply_with_zero_calls(
    node: NpuNode, data: st.DataObject
) -> None:
    # One node for all examples: each starts from the layout the previous one left.
    index = data.draw(st.integers(0, len(MODELS) - 1), label="chip")
    model = MODELS[MODEL_NAMES[index]]
    names = [template.name for template in model.templates]
    desired = data.draw(
        st.dictionaries(st.sampled_from(names), st.integers(0, 3) | st.integers(0, 17)),
        label="desired",
    )
    backend = node.backend
    try:
        layout = plan(backend, index, desired)
    except LayoutError:
        accepted = False
    else:
        accepted = True
    assert builds_on_an_empty_chip(node.sim.lib, index + len(MODELS), desired) == accepted
    event("accepted" if accepted else "refused")
    if not accepted:
        return
    before = node.counter()
    apply(backend, index, layout)
    assert node.counter() - before == layout.mutations
    have = Counter(vnpu.profile for vnpu in backend.vnpus(index))
    assert have == Counter({name: count for name, count in desired.items() if count})
    kept = {vnpu.gpu_instance_id for vnpu in layout.keep}
    assert kept <= {vnpu.gpu_instance_id for vnpu in backend.vnpus(index)}
    # Re-applying: an empty plan, and the counter does not move.
    again = plan(backend, index, desired)
    before = node.counter()
    apply(backend, index, again)
    assert (again.mutations, node.counter()) == (0, before)


def test_a_whole_npu_layout_removes_every_vnpu(node: NpuNode) -> None:
    backend = node.backend
    apply(backend, 0, plan(backend, 0, {"vir16": 1, "vir08": 2}))
    assert len(backend.vnpus(0)) == 3
    layout = plan(backend, 0, {})
    assert (len(layout.destroy), layout.create) == (3, ())
    apply(backend, 0, layout)
    assert backend.vnpus(0) == []
    assert backend.inventory()[0].instances == ()
