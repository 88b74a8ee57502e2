"""Loopback plumbing shared by the admin gate, the admin clients, the benches and the tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy ``reader`` to ``writer`` until it ends or fails, then half-close ``writer``."""
    with contextlib.suppress(OSError, ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError, RuntimeError):
        writer.write_eof()


def why_nobody_listens(path: Path) -> str | None:
    """Why no server answers on the Unix socket ``path``, or None where one listens (a gRPC
    UNAVAILABLE is then the server's own answer, or a transport failure its details describe)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except FileNotFoundError:
        return "no socket there"
    except ConnectionRefusedError:
        # A server removes its socket on a clean stop: this one is left from a crash or a kill.
        return "a stale socket: nothing listens on it"
    except OSError:
        return None
    finally:
        probe.close()
    return None
