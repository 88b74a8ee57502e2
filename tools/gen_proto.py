"""Regenerate agent/proto from proto/*.proto (and check it is current with --check).

grpc_tools writes absolute imports (`from accelguard.v1 import admin_pb2`); we rewrite them to
the package path so the generated code lives inside `agent` without touching sys.path.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

# protoc finds plugins (protoc-gen-mypy) on PATH: prefer the ones installed beside this Python.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUTPUT = ROOT / "agent" / "proto"


def generate(destination: Path) -> None:
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    destination.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={destination}",
        f"--grpc_python_out={destination}",
        f"--mypy_out={destination}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for path in destination.rglob("*.py*"):
        text = path.read_text()
        text = re.sub(r"^from accelguard\.", "from agent.proto.accelguard.", text, flags=re.M)
        text = re.sub(r"^import accelguard\.", "import agent.proto.accelguard.", text, flags=re.M)
        path.write_text(text)
    for directory in [destination, *[d for d in destination.rglob("*") if d.is_dir()]]:
        (directory / "__init__.py").touch()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="fail if agent/proto is stale")
    args = parser.parse_args()
    if not args.check:
        shutil.rmtree(OUTPUT, ignore_errors=True)
        generate(OUTPUT)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch) / "proto"
        generate(fresh)
        stale = [
            str(path.relative_to(fresh))
            for path in fresh.rglob("*")
            if path.is_file()
            and (
                not (OUTPUT / path.relative_to(fresh)).exists()
                or not filecmp.cmp(path, OUTPUT / path.relative_to(fresh), shallow=False)
            )
        ]
        extra = [
            str(path.relative_to(OUTPUT))
            for path in OUTPUT.rglob("*")
            if path.is_file()
            and "__pycache__" not in path.parts
            and not (fresh / path.relative_to(OUTPUT)).exists()
        ]
    if stale or extra:
        print(
            f"agent/proto is stale: {', '.join(stale + extra)}; run `make proto`", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
