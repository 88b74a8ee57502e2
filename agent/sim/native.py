"""What every part of the simulated node shares: building a simulator library on first use, and
making its character device nodes."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from agent.errors import ValidationError


def ensure_built(source: Path, library: Path) -> Path:
    """Build a simulator (``make -C source``) if this checkout has its source but not
    ``library`` yet."""
    if not library.exists():
        if not (source / "Makefile").exists():
            raise ValidationError(f"{source.name} is not built and its source is missing: {source}")
        result = subprocess.run(
            ["make", "-s", "-C", str(source)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise ValidationError(f"building {source.name} failed: {result.stderr.strip()[-500:]}")
    return library


def make_char_node(path: Path, major: int, minor: int) -> None:
    """A character device node ``major:minor`` at ``path`` (kept if it is one already)."""
    if os.path.lexists(path):
        info = path.lstat()
        if (
            stat.S_ISCHR(info.st_mode)
            and os.major(info.st_rdev) == major
            and os.minor(info.st_rdev) == minor
        ):
            return
        path.unlink()
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    # mknod applies the umask; the cgroup fence, not the mode, is what keeps tenants out.
    path.chmod(0o666)
