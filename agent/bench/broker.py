"""A real mosquitto for the edge bench and tests, configured from the shipped example
(docs/edge/mosquitto.conf and docs/edge/acl) with only the port, the file locations, persistence
and the controller's name (its trust domain) rewritten, and the broker certificate issued by the
controller CA as `accelguard controller broker-certificate` does."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Final

from agent.errors import LinkError
from agent.runtime.net import free_port
from agent.runtime.process import stop_process

EXAMPLES: Final = Path(__file__).resolve().parents[2] / "docs" / "edge"
EXAMPLE_CONTROLLER: Final = "user controller@accelguard.local\n"
START_TIMEOUT_S: Final = 20.0


class Broker:
    """mosquitto in a directory of its own under /tmp: started as root it runs as the
    "mosquitto" user, which could not enter a private temp dir."""

    def __init__(self, pki_dir: Path, trust_domain: str, *, persistence: bool = True) -> None:
        self.pki_dir = pki_dir
        self.trust_domain = trust_domain
        self.persistence = persistence
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="accelguard-mosquitto-"))
        self.files = self.root / "etc"
        self.data = self.root / "data"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "mosquitto.log"

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    def prepare(self) -> None:
        from agent.controller.pki import (  # noqa: PLC0415
            ControllerPki,
            bridge_identity,
            issue_service_certificate,
        )
        from agent.identity.files import write_private  # noqa: PLC0415

        if not (EXAMPLES / "mosquitto.conf").exists():
            raise LinkError(f"no broker example at {EXAMPLES}: run from the source tree")
        self.files.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(exist_ok=True)
        pki = ControllerPki(self.pki_dir, self.trust_domain)
        key, chain = issue_service_certificate(pki, "localhost", ["localhost", "127.0.0.1"],
                                               server=True)  # fmt: skip
        write_private(self.files / "broker.key", key)
        write_private(self.files / "broker.pem", chain)
        write_private(self.files / "ca.pem", pki.ca_pem)
        acl = (EXAMPLES / "acl").read_text()
        if EXAMPLE_CONTROLLER not in acl:
            raise LinkError("docs/edge/acl no longer names controller@accelguard.local")
        identity = bridge_identity(self.trust_domain)
        (self.files / "acl").write_text(acl.replace(EXAMPLE_CONTROLLER, f"user {identity}\n"))
        self.configure(self.persistence)
        with contextlib.suppress(KeyError):
            account = pwd.getpwnam("mosquitto")
            for path in (self.root, self.files, self.data, *self.files.iterdir()):
                os.chown(path, account.pw_uid, account.pw_gid)

    def configure(self, persistence: bool) -> None:
        """mosquitto.conf from the example (takes effect at the next start)."""
        self.persistence = persistence
        config = (EXAMPLES / "mosquitto.conf").read_text()
        replacements = {
            "/etc/mosquitto/accelguard/": f"{self.files}/",
            "persistence_location /var/lib/mosquitto/": f"persistence_location {self.data}/",
            "listener 8883\n": f"listener {self.port} 127.0.0.1\n",
            "persistence true\n": f"persistence {'true' if persistence else 'false'}\n",
        }
        for old, new in replacements.items():
            if old not in config:
                raise LinkError(f"docs/edge/mosquitto.conf no longer has {old.strip()!r}")
            config = config.replace(old, new)
        (self.root / "mosquitto.conf").write_text(config)

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [binary, "-c", str(self.root / "mosquitto.conf")],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise LinkError(f"mosquitto exited: {self.log_path.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            except OSError:
                if time.monotonic() > deadline:
                    raise LinkError("mosquitto did not listen") from None
                time.sleep(0.05)
            else:
                return

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if sig == signal.SIGTERM:
            stop_process(self.process)
        else:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)
        self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
