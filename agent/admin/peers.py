"""Who is calling: the admin socket's callers identified by the kernel (``SO_PEERCRED``).

gRPC does not tell a server the credentials of a Unix-socket peer. So the public admin socket is
not gRPC's: :class:`CallerGate` accepts each connection itself, reads the caller's pid, uid and
gid from the kernel, and passes the bytes on to the gRPC server's own socket in a private
directory (0700, root's) from a client socket bound to a path of its own. gRPC reports that path
as the call's peer (``context.peer()`` is ``unix:<path>``), and :meth:`CallerGate.caller` maps it
back to the caller. A connection that did not come through the gate has no caller and is
refused; only root can reach the private socket at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from agent.errors import AdminApiError, PermissionDeniedError
from agent.runtime.net import pipe

log = structlog.get_logger(__name__)

# sun_path holds 108 bytes with its terminating NUL.
MAX_SOCKET_PATH: Final = 107
# Connections at once, at most (each has a private socket named by the lowest free number).
MAX_CONNECTIONS: Final = 9999
_UCRED: Final = struct.Struct("3i")


@dataclass(frozen=True)
class Caller:
    pid: int
    uid: int
    gid: int
    # Supplementary groups as /proc/<pid>/status said when the connection was made (empty when
    # it could not be read: the process already gone).
    groups: frozenset[int]

    def in_group(self, gid: int) -> bool:
        return self.gid == gid or gid in self.groups

    def describe(self) -> str:
        return f"uid {self.uid} (pid {self.pid})"


def peer_caller(sock: socket.socket) -> Caller:
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return Caller(pid, uid, gid, _groups(pid))


def _groups(pid: int) -> frozenset[int]:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return frozenset(int(g) for g in line.split()[1:])
    return frozenset()


def authorize(
    call: str,
    caller: Caller | None,
    *,
    changes: bool,
    admin_gid: int | None,
    gate: Path,
    what: str = "the node",
    group_key: str = "admin.group",
) -> None:
    """Refuse (PermissionDeniedError) a call whose caller is unknown, or a changing call from
    anyone but root and members of the admin group; reads are for whoever reached the socket
    (its mode and group decide that)."""
    if caller is None:
        raise PermissionDeniedError(
            f"{call}: the caller is unknown (calls must come through {gate})"
        )
    if changes and caller.uid != 0 and (admin_gid is None or not caller.in_group(admin_gid)):
        raise PermissionDeniedError(
            f"{call} changes {what}: only root and members of the admin group ({group_key}) may "
            f"call it, not {caller.describe()}"
        )


class CallerGate:
    """The public socket in front of a gRPC server; see the module docstring."""

    def __init__(self, public: Path) -> None:
        self.public = public
        # Beside the public socket, the same name each start (a killed run's is replaced); in a
        # fresh temporary directory instead where that path would be too long for a socket.
        self.private = public.parent / f".{public.name}.d"
        self._temporary = len(os.fsencode(self.private / f"c{MAX_CONNECTIONS}")) > MAX_SOCKET_PATH
        self._callers: dict[str, Caller] = {}
        self._numbers: set[int] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def backend(self) -> Path:
        """gRPC's own socket."""
        return self.private / "g"

    def prepare(self) -> None:
        """The private directory, new and root's only (0700)."""
        try:
            if self._temporary:
                self.private = Path(tempfile.mkdtemp(prefix="accelguard-admin-"))
            else:
                if self.private.is_dir() and not self.private.is_symlink():
                    shutil.rmtree(self.private)
                # Fails if anything (a symlink, a file someone planted) is still there: refused.
                self.private.mkdir(mode=0o700)
        except OSError as error:
            raise AdminApiError(
                f"cannot create the admin socket's private directory: {error}"
            ) from None
        if len(os.fsencode(self.private / f"c{MAX_CONNECTIONS}")) > MAX_SOCKET_PATH:
            raise AdminApiError(
                f"no directory for the admin socket's private sockets fits a Unix socket path "
                f"({MAX_SOCKET_PATH} bytes): {self.private}"
            )

    def caller(self, peer: str) -> Caller | None:
        """The caller behind a gRPC call whose ``context.peer()`` is ``peer``."""
        return self._callers.get(peer.removeprefix("unix:"))

    async def start(self) -> None:
        """Listen on the public path (the caller sets its mode and group afterwards)."""
        self._server = await asyncio.start_unix_server(self._accept, str(self.public))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        shutil.rmtree(self.private, ignore_errors=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        number = min(set(range(1, len(self._numbers) + 2)) - self._numbers)
        if number > MAX_CONNECTIONS:
            log.warning("admin_gate_refused", error=f"over {MAX_CONNECTIONS} connections at once")
            writer.transport.abort()
            return
        self._numbers.add(number)
        path = str(self.private / f"c{number}")
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            caller = peer_caller(writer.get_extra_info("socket"))
            upstream.setblocking(False)
            upstream.bind(path)
            self._callers[path] = caller
            await asyncio.get_running_loop().sock_connect(upstream, str(self.backend))
            up_reader, up_writer = await asyncio.open_unix_connection(sock=upstream)
        except OSError as error:
            log.warning("admin_gate_refused", error=str(error))
            self._forget(number, path)
            upstream.close()
            writer.transport.abort()
            return
        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            # The caller is forgotten before its socket's name is released.
            self._forget(number, path)
            up_writer.transport.abort()
            writer.transport.abort()

    def _forget(self, number: int, path: str) -> None:
        self._callers.pop(path, None)
        Path(path).unlink(missing_ok=True)
        self._numbers.discard(number)
