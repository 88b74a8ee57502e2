"""Named failpoints for crash testing (after etcd's gofail).

Only active when ``ACCELGUARD_FAILPOINTS`` names them (comma-separated); then reaching the point
makes the process SIGKILL itself, the harshest crash there is: no finally blocks, no atexit, no
flushed buffers. Tests use it to prove the journal and start-up reconciliation restore safety from
every step. In production the variable is unset and ``hit`` is a set lookup.
"""

from __future__ import annotations

import os
import signal

ENVIRONMENT_VARIABLE = "ACCELGUARD_FAILPOINTS"

# Every failpoint the code base defines; tests iterate over this list so a new step cannot be
# added without being crash-tested.
KNOWN: set[str] = set()


def _enabled() -> frozenset[str]:
    raw = os.environ.get(ENVIRONMENT_VARIABLE, "")
    return frozenset(name.strip() for name in raw.split(",") if name.strip())


def register(name: str) -> str:
    KNOWN.add(name)
    return name


def active(name: str) -> bool:
    """For test hooks that must do something other than crash (e.g. hang, corrupt)."""
    return name in _enabled()


def hit(name: str) -> None:
    """Crash here if this failpoint is enabled."""
    if name in _enabled():
        os.kill(os.getpid(), signal.SIGKILL)
