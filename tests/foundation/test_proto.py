from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

PROTOS = sorted(p.name for p in (REPO / "proto" / "accelguard" / "v1").glob("*.proto"))


def _check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(root / "tools" / "gen_proto.py"), "--check"],
        capture_output=True, text=True, check=False, cwd=root,
    )  # fmt: skip


def test_generated_protobuf_code_is_current() -> None:
    result = _check(REPO)
    assert result.returncode == 0, result.stderr


def test_every_proto_has_committed_generated_code() -> None:
    generated = REPO / "agent" / "proto" / "accelguard" / "v1"
    for name in PROTOS:
        stem = name.removesuffix(".proto")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert (generated / f"{stem}{suffix}").is_file(), f"{stem}{suffix} missing"


@pytest.mark.parametrize("proto_name", PROTOS)
def test_staleness_check_detects_an_edited_proto(tmp_path: Path, proto_name: str) -> None:
    copy = tmp_path / "repo"
    for part in ("tools", "proto", "agent/proto"):
        shutil.copytree(REPO / part, copy / part)
    proto = copy / "proto" / "accelguard" / "v1" / proto_name
    proto.write_text(proto.read_text() + "\nmessage AddedLater { string x = 1; }\n")
    result = _check(copy)
    assert result.returncode == 1
    assert "stale" in result.stderr
    assert proto_name.removesuffix(".proto") in result.stderr
