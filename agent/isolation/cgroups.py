"""Where cgroups are mounted, and validation of the cgroup path a tenant asks to be fenced.

Mounts come from /proc/self/mountinfo, never from hard-coded paths: a hybrid node has cgroup v1
``devices`` at /sys/fs/cgroup/devices and cgroup v2 at /sys/fs/cgroup/unified, a unified node has
cgroup2 at /sys/fs/cgroup, and a container may see either somewhere else.
"""

from __future__ import annotations

import functools
import os
import re
import select
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.errors import IsolationError, ValidationError

MOUNTINFO = Path("/proc/self/mountinfo")

CgroupHierarchy = Literal["v1-devices", "v2"]

# show_mountinfo escapes these four bytes as \ooo (fs/proc_namespace.c, mangle_path " \t\n\\").
_ESCAPED = re.compile(r"\\([0-7]{3})")
_SEPARATOR = "-"
_FIELDS_BEFORE_OPTIONAL = 6
_FIELDS_AFTER_SEPARATOR = 3


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo, the fields a cgroup lookup needs."""

    mount_id: int
    root: str
    mount_point: Path
    fs_type: str
    super_options: frozenset[str]

    @property
    def hierarchy(self) -> CgroupHierarchy | None:
        if self.fs_type == "cgroup2":
            return "v2"
        if self.fs_type == "cgroup" and "devices" in self.super_options:
            return "v1-devices"
        return None


def unescape_mount_field(field: str) -> str:
    def replace(match: re.Match[str]) -> str:
        value = int(match.group(1), 8)
        if value > 0x7F:
            raise IsolationError(f"mountinfo escape \\{match.group(1)} is not an ASCII character")
        return chr(value)

    return _ESCAPED.sub(replace, field)


def parse_mountinfo(text: str) -> tuple[Mount, ...]:
    """Parse proc(5) mountinfo.

    Each line: ``id parent major:minor root mount-point options [optional...] - fstype source
    super-options``; raises IsolationError naming the line if one is malformed.
    """
    mounts = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line:
            continue
        fields = line.split(" ")
        try:
            separator = fields.index(_SEPARATOR, _FIELDS_BEFORE_OPTIONAL)
        except ValueError:
            raise IsolationError(
                f"/proc/self/mountinfo line {number} is malformed: no ' - ' after the 6th field"
            ) from None
        if len(fields) - separator - 1 != _FIELDS_AFTER_SEPARATOR:
            raise IsolationError(
                f"/proc/self/mountinfo line {number} is malformed: expected fstype, source and "
                f"super options after ' - ', got {len(fields) - separator - 1} fields"
            )
        mount_id_text, _parent, _device, root, mount_point = fields[:5]
        if not mount_id_text.isascii() or not mount_id_text.isdigit():
            raise IsolationError(
                f"/proc/self/mountinfo line {number} is malformed: mount id {mount_id_text!r}"
            )
        try:
            mount_point = unescape_mount_field(mount_point)
            root = unescape_mount_field(root)
        except IsolationError as error:
            raise IsolationError(f"/proc/self/mountinfo line {number}: {error}") from None
        if not mount_point.startswith("/"):
            raise IsolationError(
                f"/proc/self/mountinfo line {number} is malformed: "
                f"mount point {mount_point!r} is not absolute"
            )
        fs_type, _source, super_options = fields[separator + 1 :]
        mounts.append(
            Mount(
                mount_id=int(mount_id_text),
                root=root,
                mount_point=Path(mount_point),
                fs_type=fs_type,
                super_options=frozenset(super_options.split(",")),
            )
        )
    return tuple(mounts)


_parsed: dict[Path, tuple[str, tuple[Mount, ...]]] = {}


class _MountWatch:
    """This process's mount table, read again only when the kernel says it changed: poll(2) on
    an open ``/proc/self/mountinfo`` reports POLLPRI|POLLERR once after any mount or unmount in
    its namespace (proc(5)). A grant looks the table up several times; each read makes the
    kernel print the whole table."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._descriptor: int | None = None
        self._poller = select.poll()
        self._mounts: tuple[Mount, ...] | None = None

    def mounts(self) -> tuple[Mount, ...]:
        with self._lock:
            if self._descriptor is None:
                try:
                    self._descriptor = os.open(MOUNTINFO, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as error:
                    raise IsolationError(f"cannot read {MOUNTINFO}: {error.strerror}") from error
                self._poller.register(self._descriptor, select.POLLPRI | select.POLLERR)
            # Polled before reading: a change after the poll is reported by the next one.
            if self._poller.poll(0) or self._mounts is None:
                self._mounts = parse_mountinfo(self._read(self._descriptor))
            return self._mounts

    @staticmethod
    def _read(descriptor: int) -> str:
        chunks = []
        try:
            os.lseek(descriptor, 0, os.SEEK_SET)
            while chunk := os.read(descriptor, 1 << 16):
                chunks.append(chunk)
        except OSError as error:
            raise IsolationError(f"cannot read {MOUNTINFO}: {error.strerror}") from error
        # surrogateescape keeps non-UTF-8 mount points byte-exact, as os.fsdecode does.
        return b"".join(chunks).decode("utf-8", "surrogateescape")


_watch = _MountWatch()


def read_mounts(mountinfo: Path = MOUNTINFO) -> tuple[Mount, ...]:
    """The current mounts: this process's from the kernel (``_MountWatch``); another file (a
    test's) is read every time and parsed again only when its text changed."""
    if mountinfo == MOUNTINFO:
        return _watch.mounts()
    try:
        text = mountinfo.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as error:
        raise IsolationError(f"cannot read {mountinfo}: {error.strerror}") from error
    cached = _parsed.get(mountinfo)
    if cached is not None and cached[0] == text:
        return cached[1]
    mounts = parse_mountinfo(text)
    _parsed[mountinfo] = (text, mounts)
    return mounts


def mount_containing(path: Path, mounts: Sequence[Mount]) -> Mount | None:
    """The mount ``path`` (absolute, symlink-free) lives on: the deepest, the latest of equals."""
    best: Mount | None = None
    # String prefixes on whole components: Path.parents comparisons cost a grant milliseconds.
    text = str(path)
    for mount in mounts:
        point = str(mount.mount_point)
        contains = text == point or text.startswith(point if point == "/" else point + "/")
        # mountinfo lists mounts in the order they were made; a later mount on the same point
        # hides the earlier one, so >= keeps the last.
        if contains and (
            best is None or len(mount.mount_point.parts) >= len(best.mount_point.parts)
        ):
            best = mount
    return best


def cgroup_hierarchy(path: Path, mounts: Sequence[Mount] | None = None) -> CgroupHierarchy | None:
    """``"v2"``, ``"v1-devices"`` or None for a path on neither kind of cgroup mount."""
    mount = mount_containing(path, read_mounts() if mounts is None else mounts)
    return None if mount is None else mount.hierarchy


def hierarchy_mounts(
    hierarchy: CgroupHierarchy, mounts: Sequence[Mount] | None = None
) -> tuple[Path, ...]:
    """Mount points of one kind of cgroup hierarchy, in mount order (for tests and diagnostics)."""
    found = read_mounts() if mounts is None else mounts
    return tuple(mount.mount_point for mount in found if mount.hierarchy == hierarchy)


def resolve_tenant_cgroup(path: str, allowed_parents: Sequence[Path]) -> Path:
    """Check that ``path`` names a real cgroup strictly under an allowed parent, and return it.

    The path comes from a tenant or scheduler, so it is distrusted: it must be absolute, with no
    ``..`` or ``.`` components and no symlink anywhere (each component checked with lstat, and
    the realpath compared), exist as a directory on a cgroup v2 or cgroup v1 ``devices`` mount,
    and lie strictly below one of ``allowed_parents``. Every rejection is a ValidationError that
    says which rule failed; nothing is changed.
    """
    if not isinstance(path, str):
        raise ValidationError(f"tenant cgroup must be a path string, got {type(path).__name__}")
    if not path:
        raise ValidationError("tenant cgroup path is empty")
    if "\x00" in path:
        raise ValidationError(f"tenant cgroup path {path!r} contains a NUL byte")
    if not path.startswith("/"):
        raise ValidationError(f"tenant cgroup path {path!r} is not absolute")
    components = [part for part in path.split("/") if part]
    if ".." in components:
        raise ValidationError(
            f"tenant cgroup path {path!r} contains '..': refusing to walk upwards"
        )
    if "." in components:
        raise ValidationError(f"tenant cgroup path {path!r} contains '.': give the canonical path")
    candidate = Path("/", *components)

    if not allowed_parents:
        raise ValidationError(
            "no allowed parent cgroups are configured: refusing every tenant cgroup"
        )
    parents = _real_parents(tuple(allowed_parents))
    text = str(candidate)
    if not any(text != parent and text.startswith(parent.rstrip("/") + "/") for parent in parents):
        listed = ", ".join(parents)
        raise ValidationError(
            f"tenant cgroup {str(candidate)!r} is not strictly under an allowed parent ({listed})"
        )

    # With no "." or ".." and no symlink on the way, the path is its own realpath.
    _check_no_symlinks(candidate)
    mount = mount_containing(candidate, read_mounts())
    if mount is None or mount.hierarchy is None:
        where = "no mount" if mount is None else f"{mount.fs_type} mounted at {mount.mount_point}"
        raise ValidationError(
            f"tenant cgroup {str(candidate)!r} is not a cgroup: it is on {where}, "
            "not on a cgroup v2 or cgroup v1 devices hierarchy"
        )
    return candidate


@functools.lru_cache(maxsize=8)
def _real_parents(allowed_parents: tuple[Path, ...]) -> tuple[str, ...]:
    """The configured parents' realpaths, resolved once per process (they come from the
    configuration, and resolving them cost every grant about 0.05 ms)."""
    return tuple(os.path.realpath(parent) for parent in allowed_parents)


def _check_no_symlinks(candidate: Path) -> None:
    text = str(candidate)
    # Each component's path as a plain string (pathlib's parents cost a grant 0.05 ms).
    ends = [index for index in range(1, len(text)) if text[index] == "/"] + [len(text)]
    for end in ends:
        current = text[:end]
        try:
            status = os.lstat(current)
        except FileNotFoundError:
            raise ValidationError(
                f"tenant cgroup {text!r} does not exist ({current!r} is missing)"
            ) from None
        except OSError as error:
            raise ValidationError(
                f"tenant cgroup {text!r}: cannot inspect {current!r}: {error.strerror}"
            ) from error
        if stat.S_ISLNK(status.st_mode):
            raise ValidationError(f"tenant cgroup {text!r} goes through a symlink at {current!r}")
        if not stat.S_ISDIR(status.st_mode):
            raise ValidationError(f"tenant cgroup {text!r}: {current!r} is not a directory")
