"""Stopping a child process the one way: SIGTERM, a grace period, then SIGKILL."""

from __future__ import annotations

import subprocess
from typing import Any


def stop_process(process: subprocess.Popen[Any], timeout: float = 30.0) -> int:
    """Terminate ``process`` (if it still runs), wait up to ``timeout`` seconds, then kill it;
    its exit code."""
    if process.poll() is None:
        process.terminate()
    try:
        return int(process.wait(timeout=timeout))
    except subprocess.TimeoutExpired:
        process.kill()
        return int(process.wait())
