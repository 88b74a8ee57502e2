"""Helpers for the nvml-sim tests: a simulated node's directory and the files other tools write."""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynvml

from tests.support import fast_temp_dir, mutating_calls

REPO = Path(__file__).resolve().parents[2]
SIM_SOURCE = REPO / "native" / "nvml-sim"
LIBRARY = SIM_SOURCE / "build" / "libnvidia-ml.so.1"

DEFAULT_TOPOLOGY = """\
# test node: one GPU of each simulated model
gpu 0 H100-80GB mig=1
gpu 1 A100-40GB mig=1
gpu 2 A100-80GB mig=0
"""


def new_state_dir() -> Path:
    return fast_temp_dir("nvmlsim-")


@dataclass
class SimDir:
    """One simulated node's NVML_SIM_DIR, with the control files other tools write."""

    path: Path
    library: ctypes.CDLL

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "NVML_SIM_DIR": str(self.path)}

    def counter(self) -> int:
        return mutating_calls(self.path)

    def _locked_rewrite(self, name: str, lines: list[str]) -> None:
        # The contract for DIR/processes: edited under an exclusive flock on DIR/state.lock.
        with (self.path / "state.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            (self.path / name).write_text("".join(lines))

    def add_process(self, pid: int, gpu: int, gi: int, ci: int, used: int = 1 << 30) -> None:
        path = self.path / "processes"
        existing = path.read_text().splitlines(keepends=True) if path.exists() else []
        self._locked_rewrite("processes", [*existing, f"{pid} {gpu} {gi} {ci} {used}\n"])

    def remove_process(self, pid: int) -> None:
        path = self.path / "processes"
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if line.split()[:1] != [str(pid)]]  # fmt: skip
        self._locked_rewrite("processes", kept)

    def append_xid(self, line: str) -> None:
        with (self.path / "xid").open("a") as xid:
            xid.write(line + "\n")

    def append_health(self, line: str) -> None:
        with (self.path / "health").open("a") as health:
            health.write(line + "\n")

    def reset_gpu(self, index: int) -> int:
        return int(self.library.nvmlSimResetGpu(ctypes.c_uint(index)))

    def run_python(self, code: str, timeout: float = 60) -> Any:
        """Run `code` in a fresh interpreter with the sim preloaded and NVML initialised; the
        script sets ``result``, which comes back as JSON."""
        script = PRELUDE.format(library=str(LIBRARY)) + textwrap.dedent(code) + EPILOGUE
        completed = subprocess.run(
            [sys.executable, "-c", script],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert completed.returncode == 0, completed.stderr
        return json.loads(completed.stdout.strip().splitlines()[-1])


PRELUDE = """\
import ctypes, json
ctypes.CDLL({library!r}, mode=ctypes.RTLD_GLOBAL)
import pynvml
pynvml.nvmlInit()
result = None
"""
EPILOGUE = """
pynvml.nvmlShutdown()
print(json.dumps(result))
"""


def write_topology(path: Path, topology: str) -> None:
    (path / "topology").write_text(topology)


def nvml_code(error: pynvml.NVMLError) -> int:
    return int(error.value)
