"""PCI function reset through the simulated ``reset`` attribute, and the reset scrub."""

from __future__ import annotations

import dataclasses
import os

import pytest

from agent.errors import HardwareError, ScrubError
from agent.scrub.reset import ResetOutcome, reset_scrub
from agent.sim.accel import reset_count
from tests.accel.tree import AccelNode


def test_each_reset_is_recorded_once(accel_node: AccelNode) -> None:
    backend = accel_node.backend
    first, second = backend.inventory()
    assert reset_count(accel_node.sys_root, "0000:3b:00.0") == 0

    backend.reset(first)
    backend.reset(first)
    backend.reset(second)

    assert reset_count(accel_node.sys_root, "0000:3b:00.0") == 2
    assert reset_count(accel_node.sys_root, "0000:3c:00.0") == 1
    # Appended, as the kernel's attribute would take them: never truncated, never created.
    assert (accel_node.function(0) / "reset").read_bytes() == b"1\n1\n"


def test_missing_reset_attribute_is_refused(accel_node: AccelNode) -> None:
    device = accel_node.backend.inventory()[0]
    reset = accel_node.function(0) / "reset"
    reset.unlink()
    with pytest.raises(HardwareError, match=r"accel 0 \(0000:3b:00.0\) has no PCI function reset"):
        accel_node.backend.reset(device)
    assert not reset.exists()


def test_reset_of_a_vanished_function_is_refused(accel_node: AccelNode) -> None:
    device = accel_node.backend.inventory()[1]
    (accel_node.sys_root / "bus" / "pci" / "devices" / "0000:3c:00.0").unlink()
    with pytest.raises(HardwareError, match="is gone"):
        accel_node.backend.reset(device)


def test_reset_refuses_a_path_for_a_pci_address(accel_node: AccelNode) -> None:
    device = dataclasses.replace(accel_node.backend.inventory()[0], pci_bus_id="../../../etc")
    with pytest.raises(HardwareError, match="not a PCI device"):
        accel_node.backend.reset(device)


def test_reset_attribute_that_is_not_a_file_is_refused(accel_node: AccelNode) -> None:
    device = accel_node.backend.inventory()[0]
    reset = accel_node.function(0) / "reset"
    reset.unlink()
    os.mkfifo(reset)
    # O_NONBLOCK: a FIFO without a reader fails at once (ENXIO) instead of hanging the agent.
    with pytest.raises(HardwareError, match="reset"):
        accel_node.backend.reset(device)


def test_reset_scrub_reports_an_unverified_reset(accel_node: AccelNode) -> None:
    device = accel_node.backend.inventory()[1]
    outcome = reset_scrub(accel_node.backend, device)
    assert isinstance(outcome, ResetOutcome)
    assert (outcome.method, outcome.verified) == ("reset", False)
    assert outcome.seconds >= 0
    assert "0000:3c:00.0" in outcome.detail
    assert reset_count(accel_node.sys_root, "0000:3c:00.0") == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        outcome.verified = True  # type: ignore[misc]


def test_reset_scrub_failure_is_a_scrub_error(accel_node: AccelNode) -> None:
    device = accel_node.backend.inventory()[0]
    (accel_node.function(0) / "reset").unlink()
    with pytest.raises(ScrubError, match=r"reset scrub of accel 0 failed: .*no PCI function reset"):
        reset_scrub(accel_node.backend, device)
