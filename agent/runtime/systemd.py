"""The systemd notify protocol (sd_notify(3)) without libsystemd.

READY=1 is sent once the first inventory is in (a dependent unit may then ask for leases),
WATCHDOG=1 from the event loop itself at half of WATCHDOG_USEC (so a wedged loop is what systemd
detects), STATUS= with a one-line summary, STOPPING=1 on shutdown. Inactive when NOTIFY_SOCKET is
unset, as outside systemd.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Protocol

import structlog

log = structlog.get_logger(__name__)


class StatusSource(Protocol):
    def summary(self) -> str: ...


class SystemdNotifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = env.get("NOTIFY_SOCKET", "")
        watchdog_usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval_s: float | None = None
        if (
            watchdog_usec.isdigit()
            and int(watchdog_usec) > 0
            and (not watchdog_pid or watchdog_pid == str(os.getpid()))
        ):
            self.watchdog_interval_s = int(watchdog_usec) / 2_000_000

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, *fields: str) -> None:
        if not self._address:
            return
        address = self._address
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace socket
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(fields).encode(), address)
        except OSError as error:
            # Losing a notification must not take the daemon down; systemd's timeout will tell.
            log.warning("systemd_notify_failed", error=str(error), fields=list(fields))

    async def run(self, ready: asyncio.Event, status: StatusSource) -> None:
        await ready.wait()
        self.notify("READY=1", f"STATUS={status.summary()}")
        if self.watchdog_interval_s is None:
            return
        while True:
            self.notify("WATCHDOG=1", f"STATUS={status.summary()}")
            await asyncio.sleep(self.watchdog_interval_s)
