"""A real software TPM (swtpm) as a process on free localhost ports: the TPM of a simulated node
in tests (attestation, enrollment, link), the demo and ``bench link``. Needs the ``swtpm``
package."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from agent.runtime.process import stop_process

SWTPM_START_LIMIT_S = 20.0


def _free_port_pair() -> int:
    """A localhost port P with P+1 also free (swtpm's server and control channels)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port >= 65535:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as second:
                second.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no pair of free localhost ports for swtpm")


class Swtpm:
    """One swtpm process serving TPM 2.0 on localhost TCP, its state in ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = self.state_dir / "swtpm.log"
        # Ports can be taken between probing and binding; try a few pairs.
        for _ in range(5):
            self.port = _free_port_pair()
            self.process = subprocess.Popen(
                [
                    "swtpm",
                    "socket",
                    "--tpm2",
                    "--server",
                    f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                    "--ctrl",
                    f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                    "--tpmstate",
                    f"dir={self.state_dir}",
                    "--flags",
                    "not-need-init,startup-clear",
                    "--log",
                    f"file={log}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_until_listening():
                return
            self.stop()
        raise RuntimeError(f"swtpm did not start; its log: {log.read_text(errors='replace')}")

    def _wait_until_listening(self) -> bool:
        if self.process is None:
            return False
        deadline = time.monotonic() + SWTPM_START_LIMIT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self.process is None:
            return
        stop_process(self.process, timeout=10)
        self.process = None
