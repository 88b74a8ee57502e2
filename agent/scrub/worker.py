"""The scrub worker: ``python -m agent.scrub.worker``, one short-lived process per partition.

Reads ``{"backend", "target", "patterns"}`` as JSON on stdin, scrubs, and prints the
``ScrubResult`` as JSON on stdout; exit 0 only when it produced a result. The daemon enforces the
deadline and treats anything else (a crash, a hang, garbage output) as a failed scrub.
"""

from __future__ import annotations

import json
import signal
import sys
import time

from agent import failpoints
from agent.errors import AccelguardError, ScrubError
from agent.scrub.base import ScrubBackend, ScrubResult, ScrubTarget

FP_HANG = failpoints.register("scrub.worker_hang")
FP_CRASH = failpoints.register("scrub.worker_crash")


def backend_named(name: str, shared_memory: bool) -> ScrubBackend:
    if name == "simmem":
        from agent.scrub.simmem import SimMemoryScrubBackend  # noqa: PLC0415

        return SimMemoryScrubBackend()
    if name == "cuda":
        from agent.scrub.cuda import CudaScrubBackend  # noqa: PLC0415

        return CudaScrubBackend(shared_memory=shared_memory)
    raise ScrubError(f"unknown scrub backend {name!r}")


def main() -> int:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        request = json.loads(sys.stdin.read())
        target = ScrubTarget.from_dict(request["target"])
        patterns = tuple(int(p) for p in request["patterns"])
        policy = str(request["policy"])
        backend = backend_named(str(request["backend"]), bool(request.get("shared_memory", False)))
    except (ValueError, KeyError, TypeError) as error:
        print(f"scrub worker: malformed request: {error}", file=sys.stderr)
        return 2
    except AccelguardError as error:
        print(f"scrub worker: {error}", file=sys.stderr)
        return 2
    if failpoints.active(FP_HANG):
        while True:  # test hook: a worker wedged in the driver
            time.sleep(3600)
    failpoints.hit(FP_CRASH)
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
