"""Whether any of a set of paths changed since a point in time: inotify(7), polled without
blocking. One read that finds nothing replaces a stat per path.

A path that does not exist is watched through its nearest existing ancestor, so its creation
(or anything else created there) counts as a change. Every event counts, the queue's overflow
included: a watch errs only towards "changed".
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
# What changes a file's content, metadata or name, or a directory's entries.
CHANGES = (
    IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
    | IN_DELETE_SELF | IN_MOVE_SELF
)  # fmt: skip

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_init1.restype = ctypes.c_int
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_add_watch.restype = ctypes.c_int


class PathWatch:
    """Reports whether any of ``paths`` changed since it was made. OSError when inotify is not
    available (no instance or watch left under the user's limits): callers check another way."""

    def __init__(self, paths: Iterable[str]) -> None:
        descriptor = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if descriptor < 0:
            number = ctypes.get_errno()
            raise OSError(number, f"inotify_init1: {os.strerror(number)}")
        self._descriptor = descriptor
        try:
            for path in paths:
                self._add(path)
        except BaseException:
            self.close()
            raise

    def _add(self, path: str) -> None:
        current = os.path.abspath(path)  # noqa: PTH100 - plain strings: cheaper, and a loop
        while True:
            if _libc.inotify_add_watch(self._descriptor, os.fsencode(current), CHANGES) >= 0:
                return
            number = ctypes.get_errno()
            parent = os.path.dirname(current)  # noqa: PTH120
            if number in (errno.ENOENT, errno.ENOTDIR) and parent != current:
                current = parent  # not there (yet): its creation shows in the parent
                continue
            raise OSError(number, f"inotify_add_watch {current}: {os.strerror(number)}")

    def changed(self) -> bool:
        """True once anything happened to a watched path (and from then on: the events are not
        consumed beyond the first read, and a closed watch counts as changed)."""
        if self._descriptor < 0:
            return True
        try:
            events = os.read(self._descriptor, 4096)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if events:
            self.close()  # stays "changed"
        return True

    def close(self) -> None:
        if self._descriptor >= 0:
            os.close(self._descriptor)
            self._descriptor = -1
