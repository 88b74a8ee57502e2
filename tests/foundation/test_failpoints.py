"""Every failpoint is exercised: a crash point by a crash test that restarts the agent and checks
the invariants, a fault by a test of its failure path. No hand-kept list: the enums are the list,
and each test module declares what it covers."""

from __future__ import annotations

from agent.runtime.failpoints import CrashPoint, Fault
from tests.foundation import test_layout_crash, test_stop_deadline
from tests.leases import (
    test_certificates,
    test_fail_closed,
    test_lease_crash,
    test_reconcile_crash,
    test_scrub_failures,
)

MODULES = (test_layout_crash, test_lease_crash, test_reconcile_crash, test_scrub_failures,
           test_certificates, test_fail_closed, test_stop_deadline)  # fmt: skip


def test_every_failpoint_has_a_test() -> None:
    covered: set[str] = set()
    for module in MODULES:
        covered |= module.COVERED
    missing = {*CrashPoint, *Fault} - covered
    assert not missing, f"failpoints without a test: {sorted(missing)}"
    assert covered <= {*CrashPoint, *Fault}


def test_failpoint_names_are_unique_and_dotted() -> None:
    names = [*CrashPoint, *Fault]
    assert len(set(names)) == len(names)
    assert all("." in name and name == name.lower() for name in names)
