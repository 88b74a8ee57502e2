"""The agent, not only the CLI, refuses MIG on with no instances unless the request says clear;
and a plan or apply says, in fields a script can test, which GPU waits for a reset."""

from __future__ import annotations

from typing import Any

import pytest

from agent.admin.client import AdminClient
from agent.errors import ValidationError
from agent.proto.accelguard.v1 import admin_pb2 as pb
from tests.layouts_desired.conftest import desired, profiles
from tests.support import RunningAgent

REFUSED = {
    "no counts": (pb.LayoutTarget(gpu_indices=[0], mig_enabled=True), "GPU 0", "clear"),
    "only zero counts": (
        pb.LayoutTarget(gpu_indices=[0], mig_enabled=True, counts={"1g.10gb": 0}),
        "GPU 0",
        "clear",
    ),
    "all GPUs, no counts": (pb.LayoutTarget(all_gpus=True, mig_enabled=True), "all GPUs", "clear"),
    "two GPUs, no counts": (
        pb.LayoutTarget(gpu_indices=[0, 1], mig_enabled=True),
        "GPU 0,1",
        "clear",
    ),
    "clear and counts": (
        pb.LayoutTarget(gpu_indices=[0], mig_enabled=True, counts={"1g.10gb": 1}, clear=True),
        "GPU 0",
        "one or the other",
    ),
    "clear and MIG off": (pb.LayoutTarget(gpu_indices=[1], clear=True), "GPU 1", "MIG off"),
    "instances and MIG off": (
        pb.LayoutTarget(gpu_indices=[1], counts={"1g.10gb": 1}),
        "GPU 1",
        "MIG off",
    ),
}


def _client(agent: RunningAgent) -> AdminClient:
    return AdminClient(agent.config.admin.socket, timeout_s=60)


def test_the_admin_api_refuses_mig_on_without_instances_unless_clear(agent: RunningAgent) -> None:
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=2")
    before_status = agent.cli_json("status")
    before_desired = agent.cli_json("layout", "desired")
    before_calls = agent.mutating_calls()
    with _client(agent) as client:
        for name, (target, gpus, reason) in REFUSED.items():
            for call in (client.apply_layout, client.plan_layout):
                with pytest.raises(ValidationError) as refused:
                    call(pb.LayoutRequest(targets=[target]))
                assert gpus in str(refused.value), (name, str(refused.value))
                assert reason in str(refused.value), (name, str(refused.value))
    # Refused means nothing changed: not the hardware, not the desired layout.
    assert agent.mutating_calls() == before_calls
    assert agent.cli_json("status") == before_status
    assert agent.cli_json("layout", "desired") == before_desired

    with _client(agent) as client:
        cleared = client.apply_layout(
            pb.LayoutRequest(
                targets=[pb.LayoutTarget(gpu_indices=[0], mig_enabled=True, clear=True)]
            )
        )
    assert [i.profile for i in cleared.gpus[0].destroyed] == ["1g.10gb", "1g.10gb"]
    assert profiles(agent, 0) == {}
    assert desired(agent)[0]["clear"] is True


def test_a_mig_parted_entry_without_devices_is_a_clear(agent: RunningAgent, tmp_path: Any) -> None:
    agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=1")
    config = tmp_path / "mig.yaml"
    config.write_text(
        "version: v1\nmig-configs:\n  all-enabled:\n    - devices: [0]\n      mig-enabled: true\n"
        "      mig-devices: {}\n"
    )
    applied = agent.cli_json("layout", "apply", "-f", str(config), "-c", "all-enabled")
    assert len(applied["gpus"][0]["destroyed"]) == 1
    assert profiles(agent, 0) == {}


def _gpu(document: dict[str, Any]) -> dict[str, Any]:
    [gpu] = document["gpus"]
    return dict(gpu)


def test_plan_and_apply_say_which_gpu_waits_for_a_reset(agent: RunningAgent) -> None:
    on = _gpu(agent.cli_json("layout", "plan", "--gpu", "0", "1g.10gb=1"))
    assert on["mig_mode"] == {"current": True, "pending": True}
    assert on["waiting_for_reset"] is False

    off = _gpu(agent.cli_json("layout", "plan", "--gpu", "1", "--mig", "off"))
    assert off["mig_mode"] == {"current": True, "pending": False}
    assert off["waiting_for_reset"] is True
    applied = _gpu(agent.cli_json("layout", "apply", "--gpu", "1", "--mig", "off"))
    assert applied["waiting_for_reset"] is True and applied["noop"] is False
    again = agent.cli("layout", "apply", "--gpu", "1", "--mig", "off")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == (
        "GPU 1: unchanged, waiting for a GPU reset (MIG off set, on in effect)"
    )
    assert desired(agent)[1]["outcome"] == "waiting_for_reset"

    assert agent.cli("sim", "reset-gpu", "--gpu", "1").returncode == 0
    settled = _gpu(agent.cli_json("layout", "plan", "--gpu", "1", "--mig", "off"))
    assert settled["mig_mode"] == {"current": False, "pending": False}
    assert settled["waiting_for_reset"] is False and settled["noop"] is True
    # MIG on asked of a GPU with MIG off: set for the next reset, not in effect before.
    back = _gpu(agent.cli_json("layout", "plan", "--gpu", "1", "1g.10gb=1"))
    assert back["mig_mode"] == {"current": False, "pending": True}
    assert back["waiting_for_reset"] is True
