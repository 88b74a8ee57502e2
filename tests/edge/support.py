"""A real mosquitto for edge tests, configured from docs/edge/ as shipped: only the port, the
file locations, persistence and the controller's name (its trust domain) are rewritten."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.link.support import Controller, free_port, run_tool, wait_for
from tests.support import REPO

EXAMPLES = REPO / "docs" / "edge"


@dataclass
class Mosquitto:
    root: Path
    controller: Controller
    persistence: bool = True
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    @property
    def files(self) -> Path:
        return self.root / "etc"

    def prepare(self) -> None:
        """Broker certificate from the controller CA, config and ACL from docs/edge/."""
        # mosquitto started as root runs as the "mosquitto" user, which cannot enter pytest's
        # private tmp_path: the broker gets a directory of its own under /tmp.
        self.root = Path(tempfile.mkdtemp(prefix="accelguard-mosquitto-"))
        self.files.mkdir(parents=True, exist_ok=True)
        result = run_tool(
            "controller", "broker-certificate", "--config", str(self.controller.config_path),
            "--name", "localhost", "--name", "127.0.0.1", "--out", str(self.files),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        identity = result.stdout.split("controller identity: ")[1].split()[0]
        acl = (EXAMPLES / "acl").read_text()
        assert "user controller@accelguard.local\n" in acl
        (self.files / "acl").write_text(
            acl.replace("user controller@accelguard.local\n", f"user {identity}\n")
        )
        (self.root / "data").mkdir(exist_ok=True)
        self.configure(self.persistence)
        # mosquitto started as root runs as the "mosquitto" user: let it read its files.
        account = pwd.getpwnam("mosquitto")
        for path in (self.root, self.files, self.root / "data", *self.files.iterdir()):
            os.chown(path, account.pw_uid, account.pw_gid)

    def configure(self, persistence: bool) -> None:
        """mosquitto.conf from docs/edge/ (takes effect at the next start)."""
        self.persistence = persistence
        data = self.root / "data"
        config = (EXAMPLES / "mosquitto.conf").read_text()
        replacements = {
            "/etc/mosquitto/accelguard/": f"{self.files}/",
            "persistence_location /var/lib/mosquitto/": f"persistence_location {data}/",
            "listener 8883\n": f"listener {self.port} 127.0.0.1\n",
            "persistence true\n": f"persistence {'true' if self.persistence else 'false'}\n",
        }
        for old, new in replacements.items():
            assert old in config, old
            config = config.replace(old, new)
        (self.root / "mosquitto.conf").write_text(config)

    def start(self) -> None:
        self.log_path = self.root / f"mosquitto-{time.monotonic_ns()}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c",
                 str(self.root / "mosquitto.conf")],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for(self._listening, "mosquitto to listen", timeout=20)

    def _listening(self) -> bool:
        import socket  # noqa: PLC0415

        assert self.process is not None and self.process.poll() is None, "mosquitto exited"
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        except OSError:
            return False
        return True

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(timeout=30)
        self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
