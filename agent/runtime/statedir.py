"""One agent per state directory (DESIGN.md invariant 6).

Two agents on one journal would each believe they own every fence and partition, and one
exiting would delete the other's admin socket. The agent (and ``accelguard state recover``)
takes an exclusive ``flock`` on ``<state_dir>/agent.lock`` before touching anything; the kernel
drops the lock when the process dies, however it dies, so a SIGKILLed agent never blocks its
successor.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from agent.errors import AlreadyRunningError, StoreError

LOCK_NAME = "agent.lock"


class StateDirLock:
    """Held for the life of the process that took it (the fd is never inherited: O_CLOEXEC)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, what: str = "agent") -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise StoreError(f"cannot open the state lock {self.path}: {error.strerror}") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise AlreadyRunningError(
                f"another accelguard agent{holder} holds the state directory {self.path.parent}: "
                f"this {what} touched nothing; stop that agent first"
            ) from None
        except OSError as error:
            os.close(fd)
            raise StoreError(f"cannot lock {self.path}: {error.strerror}") from error
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 32, 0).decode().strip()
        if text.isdigit():
            return f" (pid {int(text)})"
    return ""
