"""Where the NVIDIA driver's user-space files are on this host, so a CDI spec can mount them.

Found the way ``nvidia-ctk cdi generate`` finds them: libraries by SONAME in the dynamic linker's
directories (``/etc/ld.so.conf`` with its includes, which is what ``ldconfig`` builds its cache
from, then the standard directories), binaries by file name in the standard executable
directories. Invariants:

- only what exists is returned: a node without libcuda (a simulated node, a driver without CUDA)
  gets a spec without it, never a mount of a missing file, which would fail the container;
- only libraries of the agent's own ELF class: the 32-bit copies a multiarch driver installs
  (``/usr/lib/i386-linux-gnu``) are skipped, as nvidia-ctk skips them;
- everything is looked up below an explicit ``root`` (nvidia-ctk's ``--driver-root``), symlinks
  included, so tests point discovery at a driver tree they built; the container sees each file at
  its path below that root.
"""

from __future__ import annotations

import os
import platform
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from agent.errors import IsolationError
from agent.isolation.cgroups import Mount, read_mounts
from agent.runtime.inotify import PathWatch

# The compute and utility libraries a CUDA container needs from the driver (nvidia-ctk's "compute"
# and "utility" driver capabilities), by the SONAME a program loads them by.
DRIVER_LIBRARIES = (
    "libnvidia-ml.so.1",  # NVML: nvidia-smi, DCGM, pynvml
    "libcuda.so.1",  # the CUDA driver API
    "libcudadebugger.so.1",  # cuda-gdb's back end
    "libnvidia-ptxjitcompiler.so.1",  # JIT of PTX the application ships
    "libnvidia-nvvm.so.4",  # JIT of NVVM IR (link-time optimisation)
    "libnvidia-allocator.so.1",
    "libnvidia-cfg.so.1",
    "libnvidia-opencl.so.1",
)
DRIVER_BINARIES = (
    "nvidia-smi",
    "nvidia-debugdump",
    "nvidia-persistenced",
    "nvidia-cuda-mps-control",
    "nvidia-cuda-mps-server",
)
NVML_SONAME = "libnvidia-ml.so.1"
# The hooks that rebuild a container's linker cache, best first: the toolkit's dedicated
# nvidia-cdi-hook (1.17 and later), then the older `nvidia-ctk hook` sub-command.
LDCACHE_HOOKS = (
    ("nvidia-cdi-hook", ("nvidia-cdi-hook", "update-ldcache")),
    ("nvidia-ctk", ("nvidia-ctk", "hook", "update-ldcache")),
)
BINARY_DIRECTORIES = (
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
)
_TRIPLET = f"{platform.machine()}-linux-gnu"
# After ld.so.conf, the directories the linker searches on its own (glibc's trusted directories,
# with the Debian multiarch ones that distributions list in ld.so.conf.d).
STANDARD_LIBRARY_DIRECTORIES = (
    f"/lib/{_TRIPLET}",
    f"/usr/lib/{_TRIPLET}",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
)
LINKER_CONFIG = "/etc/ld.so.conf"
# Bounds on what is read: the linker's configuration is root's, but a loop of includes or a
# runaway file must not stall a grant.
MAX_CONFIG_BYTES = 1 << 16
MAX_CONFIG_FILES = 256
# A cached search is kept only when what it read is older than this (see _settled).
RACY_NS = 2_000_000_000
MAX_SYMLINK_HOPS = 40  # Linux's MAXSYMLINKS
_ELF_MAGIC = b"\x7fELF"
_OWN_ELF_CLASS = 2 if struct.calcsize("P") == 8 else 1  # ELFCLASS64 or ELFCLASS32


@dataclass(frozen=True)
class DriverFile:
    """A file to bind-mount: ``host_path`` is the file itself (symlinks resolved), and
    ``container_path`` the name it was found by, so a program finds it there by SONAME even
    when no hook rebuilds the container's linker cache."""

    host_path: Path
    container_path: Path


@dataclass(frozen=True)
class LdcacheHook:
    """An executable on the host that rebuilds a container's linker cache (``argv`` before the
    ``--folder`` arguments)."""

    path: Path
    argv: tuple[str, ...]


@dataclass(frozen=True)
class DriverFiles:
    libraries: tuple[DriverFile, ...] = ()
    binaries: tuple[DriverFile, ...] = ()
    ldcache_hook: LdcacheHook | None = None

    @property
    def library_folders(self) -> list[str]:
        """The container directories holding the libraries, in first-found order."""
        return list(dict.fromkeys(str(f.container_path.parent) for f in self.libraries))


@dataclass(frozen=True)
class DriverSearch:
    """Where to look: ``root`` is the driver's root (``/`` on a node); ``library_directories``
    None means the linker's own; ``pinned`` names a library by SONAME that is used instead of
    searching (the agent's configured NVML library, nvml-sim on a simulated node)."""

    root: Path = Path("/")
    library_directories: tuple[str, ...] | None = None
    binary_directories: tuple[str, ...] = BINARY_DIRECTORIES
    pinned: Mapping[str, Path] = field(default_factory=dict)


def host_search(nvml_library: str) -> DriverSearch:
    """The search for this node: its root, and the NVML library the agent itself loads."""
    return DriverSearch(pinned={NVML_SONAME: Path(nvml_library)} if nvml_library else {})


# The last discovery and the state of the directories it searched (see discover).
_last: tuple[str, tuple[tuple[str, int], ...], DriverFiles] | None = None
# The last settled discovery, watched (see discover).
_watched: _Watched | None = None
_lock = threading.Lock()


@dataclass
class _Watched:
    """A settled discovery, an inotify watch on every path it depended on, and the mount table
    it was made under (a mount over a searched directory is no inotify event)."""

    search: DriverSearch
    watch: PathWatch
    mounts: tuple[Mount, ...]
    found: DriverFiles

    def valid_for(self, search: DriverSearch) -> bool:
        return self.search == search and not self.watch.changed() and read_mounts() == self.mounts


def discover(search: DriverSearch) -> DriverFiles:
    """The driver files present under ``search.root``; raises IsolationError only when a file
    that exists cannot be read.

    Every grant writes a spec, and a full search is a few hundred stat calls: the result is kept
    while none of the searched directories changed (adding, removing or renaming a file, as a
    driver upgrade does, changes its directory's mtime), so an upgrade still reaches the next
    spec written. A settled result is also watched with inotify, and kept while the mount table
    is the same, so that the next call asks one read and one poll instead of a stat per
    directory; without inotify the mtimes are compared each time."""
    global _watched  # noqa: PLW0603 - one cache per process, under its lock
    with _lock:
        if _watched is not None and _watched.valid_for(search):
            return _watched.found
        if _watched is not None:
            _watched.watch.close()
            _watched = None
        mounts = read_mounts()  # before the search: a mount during it is a change
        found, state = _discover_by_mtimes(search)
        if state is not None:
            _watched = _watch(search, state, mounts, found)
        return found


def _discover_by_mtimes(
    search: DriverSearch,
) -> tuple[DriverFiles, tuple[tuple[str, int], ...] | None]:
    """The discovery, and the mtimes it depends on when they are settled (None otherwise)."""
    global _last  # noqa: PLW0603 - one cache per process, under discover's lock
    directories = search.library_directories
    depends: tuple[tuple[str, int], ...] = ()
    if directories is None:
        directories = tuple(linker_directories(search.root))
        depends = tuple((str(path), mtime) for path, mtime in (_linker[1] if _linker else ()))
    key = repr((search, directories))
    # Plain strings and os.stat: this runs on every grant, and pathlib costs more than the stats.
    root = str(search.root)
    searched = [os.path.join(root, name.lstrip("/")) for name in directories]  # noqa: PTH118
    searched += [
        os.path.join(root, name.lstrip("/"))  # noqa: PTH118
        for name in search.binary_directories
    ]
    searched += [str(path) for path in search.pinned.values()]
    state = tuple((path, _mtime(path)) for path in searched)
    if _last is not None and _last[0] == key and _last[1] == state:
        found = _last[2]
    else:
        found = _discover(search, directories)
        _last = (key, state, found) if _settled(state) else None
    settled = _last is not None and (search.library_directories is not None or _linker is not None)
    return found, (state + depends) if settled else None


def _watch(
    search: DriverSearch,
    state: tuple[tuple[str, int], ...],
    mounts: tuple[Mount, ...],
    found: DriverFiles,
) -> _Watched | None:
    """``found`` kept under a watch on every path of ``state``; None when inotify is not there
    or a path changed before the watch began (the mtimes are compared once it is in place)."""
    try:
        watch = PathWatch(path for path, _ in state)
    except OSError:
        return None
    if any(_mtime(path) != mtime for path, mtime in state):
        watch.close()
        return None
    return _Watched(search, watch, mounts, found)


def _mtime(path: str | Path) -> int:
    try:
        return os.stat(path).st_mtime_ns  # noqa: PTH116
    except OSError:
        return -1


def _discover(search: DriverSearch, directories: tuple[str, ...]) -> DriverFiles:
    root = search.root
    libraries = []
    for soname in DRIVER_LIBRARIES:
        pinned = search.pinned.get(soname)
        if pinned is not None:
            found = _pinned_library(pinned)
        else:
            found = _first(root, directories, soname, _is_library)
        if found is not None:
            libraries.append(found)
    binaries = [
        found
        for name in DRIVER_BINARIES
        if (found := _first(root, search.binary_directories, name, _is_executable)) is not None
    ]
    hook = None
    for name, argv in LDCACHE_HOOKS:
        found = _first(root, search.binary_directories, name, _is_executable)
        if found is not None:
            hook = LdcacheHook(found.host_path, argv)
            break
    return DriverFiles(tuple(libraries), tuple(binaries), hook)


# The last linker_directories answer, and the mtimes of what it read (files, and the directories
# its include patterns globbed): kept while none of them changed.
_linker: tuple[Path, tuple[tuple[Path, int], ...], list[str]] | None = None


def linker_directories(root: Path) -> list[str]:
    """The directories the dynamic linker searches, as paths inside ``root``: ld.so.conf's (in
    its order, includes expanded), then the standard ones."""
    global _linker  # noqa: PLW0603 - one cache per process, read and written by one thread
    if (
        _linker is not None
        and _linker[0] == root
        and all(_mtime(path) == mtime for path, mtime in _linker[1])
    ):
        return list(_linker[2])
    found: list[str] = []
    read: set[str] = set()
    globbed: set[Path] = set()
    _read_linker_config(root, LINKER_CONFIG, found, read, globbed)
    watched = {_under(root, name) for name in read} | globbed
    directories = list(dict.fromkeys([*found, *STANDARD_LIBRARY_DIRECTORIES]))
    state = tuple((path, _mtime(path)) for path in sorted(watched))
    _linker = (root, state, directories) if _settled(state) else None
    return list(directories)


def _settled(state: tuple[tuple[Any, int], ...]) -> bool:
    """Whether an answer read from files with these mtimes may be kept: not when one changed in
    the last seconds, as file times move in clock ticks of several milliseconds and a change
    later in the same tick would leave the same mtime (git's "racy" index entries)."""
    recent = time.time_ns() - RACY_NS
    return all(mtime < recent for _, mtime in state)


def _read_linker_config(
    root: Path, name: str, found: list[str], read: set[str], globbed: set[Path]
) -> None:
    """Append ``name``'s directories to ``found``; ``read`` and ``globbed`` collect the files
    read and the directories include patterns searched (what a cached answer depends on)."""
    if name in read or len(read) >= MAX_CONFIG_FILES:
        return
    read.add(name)
    text = _read_text(_under(root, name))
    if text is None:
        return
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("hwcap "):
            continue
        if line.startswith("include "):
            # glibc: a relative pattern is relative to the including file's directory.
            for pattern in line.split()[1:]:
                absolute = PurePosixPath(name).parent / pattern
                globbed.add(_under(root, str(absolute.parent)))
                matches = sorted(root.glob(str(absolute).lstrip("/")))
                for match in matches:
                    included = "/" + str(match.relative_to(root))
                    _read_linker_config(root, included, found, read, globbed)
            continue
        # libc5-era entries carry "=<type>"; several directories may share a line.
        for entry in line.replace(",", " ").replace(":", " ").split():
            directory = entry.split("=", 1)[0]
            if directory.startswith("/"):
                found.append(directory)


def _read_text(path: Path) -> str | None:
    try:
        with path.open("rb") as handle:
            return handle.read(MAX_CONFIG_BYTES).decode("utf-8", errors="replace")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as error:
        raise IsolationError(f"cannot read the linker configuration {path}: {error}") from error


def _under(root: Path, name: str) -> Path:
    return root / name.lstrip("/")


def _resolve(root: Path, path: Path) -> Path | None:
    """``path`` with every symlink resolved inside ``root`` (an absolute target means below
    ``root``, as it would inside a chroot); None if it does not exist or loops."""
    current = path
    for _ in range(MAX_SYMLINK_HOPS):
        try:
            target = str(current.readlink())
        except FileNotFoundError:
            return None
        except OSError:
            # Not a symlink (EINVAL): the parents may still be, and the kernel resolves those
            # the same way on the host, so the file itself is what a mount would show.
            return current if current.exists() else None
        current = _under(root, target) if target.startswith("/") else current.parent / target
    return None


def _first(
    root: Path, directories: tuple[str, ...], name: str, check: Callable[[Path], bool]
) -> DriverFile | None:
    for directory in directories:
        candidate = _under(root, directory) / name
        resolved = _resolve(root, candidate)
        if resolved is not None and check(resolved):
            return DriverFile(resolved, Path("/") / candidate.relative_to(root))
    return None


def _pinned_library(path: Path) -> DriverFile | None:
    resolved = path.resolve()
    if not _is_library(resolved):
        return None
    return DriverFile(resolved, path)


def _regular(path: Path) -> os.stat_result | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return status if stat.S_ISREG(status.st_mode) else None


def _is_executable(path: Path) -> bool:
    status = _regular(path)
    return status is not None and bool(status.st_mode & 0o111)


def _is_library(path: Path) -> bool:
    if _regular(path) is None:
        return False
    try:
        with path.open("rb") as handle:
            header = handle.read(5)
    except OSError as error:
        raise IsolationError(f"cannot read driver library {path}: {error}") from error
    return header[:4] == _ELF_MAGIC and header[4] == _OWN_ELF_CLASS
