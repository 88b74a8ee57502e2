"""Publishing a file whole: written under a temporary name, flushed, then put in place, so that a
reader (or a crash) sees the old file or the new one, never a part of it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def publish_file(
    path: Path, write: Callable[[BinaryIO], object], *, mode: int, replace: bool
) -> None:
    """``write`` fills a new file (``mode`` whatever the umask, never through a symlink), which
    is fsynced and then linked in as ``path``, or with ``replace`` renamed over it; the directory
    is fsynced last. Raises FileExistsError when ``path`` exists and ``replace`` is false (a link,
    unlike a rename, never replaces a file that appeared since the caller looked), and OSError
    for anything else; the temporary file never stays behind."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        descriptor = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            os.fchmod(descriptor, mode)
            with open(descriptor, "wb", closefd=False) as stream:
                write(stream)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        if replace:
            temporary.replace(path)
        else:
            os.link(temporary, path)
        fsync_path(path.parent)
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()


def fsync_path(path: Path) -> None:
    """A file's data, or a directory's entries (a rename or link in it), on disk."""
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
