"""Named failpoints for crash testing (after etcd's gofail).

Only active when ``ACCELGUARD_FAILPOINTS`` names them (comma-separated). A ``CrashPoint`` makes
the process SIGKILL itself when reached, the harshest crash there is: no finally blocks, no
atexit, no flushed buffers; tests use them to prove the journal and start-up reconciliation
restore safety from every step. A ``Fault`` is a test hook that changes behaviour instead (a
scrub worker that hangs, memory corrupted after a write). In production the variable is unset and
``hit`` is a set lookup.

Every member is exercised by the test suite: ``tests/foundation/test_failpoints.py`` fails when a
member is added without a crash or fault test that uses it.
"""

from __future__ import annotations

import os
import signal
from enum import StrEnum

ENVIRONMENT_VARIABLE = "ACCELGUARD_FAILPOINTS"


class CrashPoint(StrEnum):
    LAYOUT_BEFORE_DESTROY = "layout.before_destroy"
    LAYOUT_AFTER_DESTROY = "layout.after_destroy"
    LAYOUT_BEFORE_CREATE = "layout.before_create"
    LAYOUT_AFTER_CREATE = "layout.after_create"
    LAYOUT_BEFORE_COMPLETE_ORPHAN = "layout.before_complete_orphan"
    LAYOUT_BETWEEN_GI_AND_CI = "layout.between_gi_and_ci"
    LEASE_GRANT_AFTER_JOURNAL = "lease.grant.after_journal"
    LEASE_GRANT_AFTER_FENCE = "lease.grant.after_fence"
    LEASE_GRANT_AFTER_CDI = "lease.grant.after_cdi"
    LEASE_RELEASE_AFTER_JOURNAL = "lease.release.after_journal"
    LEASE_RELEASE_AFTER_REVOKE = "lease.release.after_revoke"
    LEASE_RELEASE_AFTER_EVICT = "lease.release.after_evict"
    SCRUB_AFTER_JOURNAL = "scrub.after_journal"
    SCRUB_AFTER_SCRUB = "scrub.after_scrub"
    RECONCILE_LOST_AFTER_JOURNAL = "reconcile.lost.after_journal"
    RECONCILE_LOST_AFTER_REVOKE = "reconcile.lost.after_revoke"
    RECONCILE_ORPHAN_AFTER_QUARANTINE = "reconcile.orphan.after_quarantine"
    SCRUB_WORKER_CRASH = "scrub.worker_crash"


class Fault(StrEnum):
    SCRUB_WORKER_HANG = "scrub.worker_hang"
    SCRUB_CORRUPT_AFTER_WRITE = "scrub.corrupt_after_write"
    SCRUB_SHORT_COVERAGE = "scrub.short_coverage"
    # The tenant's cgroup removed between a grant's journal record and its fence (as a job's
    # end removes it): the race a test cannot time from outside.
    GRANT_CGROUP_REMOVED = "lease.grant.cgroup_removed"
    # A task whose clean-up swallows the stop's cancellation and waits for ever.
    STOP_CLEANUP_HANGS = "agent.stop.cleanup_hangs"


def _enabled() -> frozenset[str]:
    raw = os.environ.get(ENVIRONMENT_VARIABLE, "")
    return frozenset(name.strip() for name in raw.split(",") if name.strip())


def active(fault: Fault) -> bool:
    """For test hooks that must do something other than crash (e.g. hang, corrupt)."""
    return fault in _enabled()


def hit(point: CrashPoint) -> None:
    """Crash here if this failpoint is enabled."""
    if point in _enabled():
        os.kill(os.getpid(), signal.SIGKILL)
