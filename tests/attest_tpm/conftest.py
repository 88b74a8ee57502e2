"""A real swtpm per test module (or per test, for tests that change persistent TPM state)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.attest.tpm import AkAlgorithm, AttestationKey, TpmClient

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
        assert self.process is not None
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
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@pytest.fixture(scope="module")
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    tpm = Swtpm(tmp_path_factory.mktemp("swtpm"))
    try:
        tpm.start()
        yield tpm
    finally:
        tpm.stop()


@pytest.fixture
def fresh_swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    """A swtpm of its own, for tests that persist keys or define NV indices."""
    tpm = Swtpm(tmp_path / "swtpm")
    try:
        tpm.start()
        yield tpm
    finally:
        tpm.stop()


@pytest.fixture(scope="module")
def tpm(swtpm: Swtpm) -> Iterator[TpmClient]:
    client = TpmClient(swtpm.tcti)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module", params=list(AkAlgorithm), ids=lambda a: str(a))
def ak(request: pytest.FixtureRequest, tpm: TpmClient) -> Iterator[AttestationKey]:
    """A transient AK of each algorithm in turn (swtpm holds only 3 loaded objects: EK, this AK
    and one spare, so it is flushed before the next algorithm's)."""
    key = tpm.create_attestation_key(request.param)
    try:
        yield key
    finally:
        tpm.flush_attestation_key(key)
