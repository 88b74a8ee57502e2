from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.support import REPO


def _check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(root / "tools" / "gen_proto.py"), "--check"],
        capture_output=True, text=True, check=False, cwd=root,
    )  # fmt: skip


def test_generated_protobuf_code_is_current() -> None:
    result = _check(REPO)
    assert result.returncode == 0, result.stderr


def test_staleness_check_detects_an_edited_proto(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    for part in ("tools", "proto", "agent/proto"):
        shutil.copytree(REPO / part, copy / part)
    proto = copy / "proto" / "accelguard" / "v1" / "admin.proto"
    proto.write_text(proto.read_text() + "\nmessage AddedLater { string x = 1; }\n")
    result = _check(copy)
    assert result.returncode == 1
    assert "stale" in result.stderr
