"""Secret files: written 0600 in full under a temporary name and renamed into place, and refused
when group or others may read them or another user owns them."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

from agent.errors import IdentityError

MAX_FILE_BYTES: Final = 64 << 10


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 atomically (a crash leaves the old file or the
    new one, never half of either)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        descriptor = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            os.fchmod(descriptor, 0o600)  # whatever the umask
            os.write(descriptor, data)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        temporary.replace(path)
    except OSError as error:
        raise IdentityError(f"cannot write {path}: {error.strerror}") from error


def read_private(path: Path, what: str) -> bytes:
    """Read a 0600 file owned by this user; IdentityError saying what to do otherwise."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise IdentityError(f"{what} {path} does not exist: enroll the node first") from None
    except OSError as error:
        raise IdentityError(f"cannot open {what} {path}: {error.strerror}") from error
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise IdentityError(f"{what} {path} is not a regular file")
        if status.st_mode & 0o077:
            raise IdentityError(
                f"{what} {path} has mode {stat.S_IMODE(status.st_mode):04o}: group or others may "
                f"read it; it must be 0600 (if it may have been read, replace it)"
            )
        if status.st_uid != os.geteuid():
            raise IdentityError(f"{what} {path} is owned by uid {status.st_uid}, not this user")
        if status.st_size > MAX_FILE_BYTES:
            raise IdentityError(f"{what} {path} is {status.st_size} bytes: not a key file")
        return os.read(descriptor, MAX_FILE_BYTES + 1)
    except OSError as error:
        raise IdentityError(f"cannot read {what} {path}: {error.strerror}") from error
    finally:
        os.close(descriptor)
