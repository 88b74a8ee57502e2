"""The scrub worker: ``python -m agent.scrub.worker``, one short-lived process per partition.

Reads ``{"backend", "target", "patterns"}`` as JSON on stdin, scrubs, and prints the
``ScrubResult`` as JSON on stdout; exit 0 only when it produced a result. The daemon enforces the
deadline and treats anything else (a crash, a hang, garbage output) as a failed scrub.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time

from agent.errors import AccelguardError, ScrubError
from agent.runtime import failpoints
from agent.runtime.failpoints import CrashPoint, Fault
from agent.scrub.model import ScrubBackend, ScrubResult, ScrubTarget

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_the_agent() -> None:
    """A worker whose agent died (SIGKILL, a crash) must not go on writing a partition that the
    restarted agent scrubs again: the kernel kills it when its parent goes."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def backend_named(name: str, shared_memory: bool, options: object = None) -> ScrubBackend:
    if name == "simmem":
        from agent.scrub.simmem import SimMemoryScrubBackend  # noqa: PLC0415

        settings = options if isinstance(options, dict) else {}
        return SimMemoryScrubBackend(
            memory_dir=str(settings.get("memory_dir", "")),
            slice_bytes=int(str(settings.get("slice_bytes", 0))),
        )
    if name == "cuda":
        from agent.scrub.cuda.backend import CudaScrubBackend  # noqa: PLC0415

        return CudaScrubBackend(shared_memory=shared_memory)
    raise ScrubError(f"unknown scrub backend {name!r}")


def main() -> int:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_the_agent()
    try:
        request = json.loads(sys.stdin.read())
        target = ScrubTarget.from_dict(request["target"])
        patterns = tuple(int(p) for p in request["patterns"])
        policy = str(request["policy"])
        options = request.get("options") or {}
        backend = backend_named(
            str(request["backend"]), bool(request.get("shared_memory", False)), options
        )
        target = backend.resolve(target)
    except (ValueError, KeyError, TypeError) as error:
        print(f"scrub worker: malformed request: {error}", file=sys.stderr)
        return 2
    except AccelguardError as error:
        print(f"scrub worker: {error}", file=sys.stderr)
        return 2
    if failpoints.active(Fault.SCRUB_WORKER_HANG):
        while True:  # test hook: a worker wedged in the driver
            time.sleep(3600)
    failpoints.hit(CrashPoint.SCRUB_WORKER_CRASH)
    try:
        passes = backend.scrub(target, patterns)
    except AccelguardError as error:
        print(f"scrub worker: {error}", file=sys.stderr)
        return 1
    result = ScrubResult(
        backend=backend.name,
        policy=policy,
        total_bytes=target.total_bytes,
        passes=passes,
        detail=str(getattr(backend, "detail", "")),
    )
    json.dump(result.to_dict(), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
