"""Serving a gRPC server on a local Unix socket that only its owner and one group may use.

Whoever can write an admin socket can act as the admin (move tenants' GPUs, enrol nodes), so the
socket is created under umask 0177 (never briefly world-writable), then given its group and mode;
a socket left by a run that was killed is replaced, and the socket is removed on the way out.
"""

from __future__ import annotations

import asyncio
import grp
import os
from pathlib import Path

import grpc
import structlog

from agent.admin.peers import CallerGate
from agent.errors import AdminApiError

log = structlog.get_logger(__name__)


async def serve_on_unix_socket(
    server: grpc.aio.Server,
    path: Path,
    *,
    mode: str,
    group: str,
    what: str,
    listening_event: str,
    gate: CallerGate | None = None,
) -> None:
    """Serve ``server`` on ``path`` until cancelled. ``mode`` is octal text (config-checked),
    ``group`` a group name or empty, ``what`` names the socket in errors ("admin socket").
    With ``gate``, the public socket is the gate's and gRPC listens behind it, so that each
    call's caller is known (agent/admin/peers.py)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()  # left by a previous run that was killed
        if gate is not None:
            gate.prepare()
    except OSError as error:
        raise AdminApiError(f"cannot prepare {what} {path}: {error}") from error
    old_umask = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix:{gate.backend if gate is not None else path}")
        await server.start()
        if gate is not None:
            await gate.start()
    finally:
        os.umask(old_umask)
    try:
        _secure(path, mode, group, what)
        log.info(listening_event, socket=str(path), callers_identified=gate is not None)
        await server.wait_for_termination()
    finally:
        if gate is not None:
            await asyncio.shield(gate.close())
        await asyncio.shield(server.stop(grace=1.0))
        path.unlink(missing_ok=True)


def _secure(path: Path, mode: str, group: str, what: str) -> None:
    try:
        if group:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        path.chmod(int(mode, 8))
    except (OSError, KeyError) as error:
        raise AdminApiError(f"cannot set owner/mode of {what} {path}: {error}") from error
