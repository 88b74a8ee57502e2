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
_PR_SET_NO_NEW_PRIVS = 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522  # linux/capability.h
_CAP_MKNOD = 27


def _die_with_the_agent() -> None:
    """A worker whose agent died (SIGKILL, a crash) must not go on writing a partition that the
    restarted agent scrubs again: the kernel kills it when its parent goes."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _drop_privileges() -> None:
    """The worker only writes and reads memory: it keeps none of the agent's capabilities
    (systemd/accelguard.service), CAP_MKNOD aside (libcuda may run nvidia-modprobe to create a
    missing device node), and can never gain one: with no_new_privs an execve grants nothing,
    neither a setuid bit nor root's legacy full set (the bounding set has no CAP_SETUID).
    A worker that cannot drop them does not scrub (the daemon quarantines the partition)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    # Two words of {effective, permitted, inheritable}: capabilities 0-31, then 32-63.
    data = (ctypes.c_uint32 * 6)()
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    keep = data[1] & (1 << _CAP_MKNOD)  # only what the worker already has
    wanted = (ctypes.c_uint32 * 6)(keep, keep, 0, 0, 0, 0)
    if libc.capset(header, wanted) != 0:
        raise OSError(ctypes.get_errno(), "capset")


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
        _drop_privileges()
    except OSError as error:
        print(f"scrub worker: cannot drop privileges: {error}", file=sys.stderr)
        return 2
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
