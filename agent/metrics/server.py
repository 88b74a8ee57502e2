"""``/metrics`` over HTTP on ``[metrics] listen`` (docs/metrics.md), one service under the daemon.

prometheus_client's WSGI app behind the standard library's WSGI server, run by one thread that
``run()`` starts and, when it is cancelled, stops and joins: the server is shut down, its socket
closed, and every request thread joined (a request cannot hold one for longer than
``REQUEST_TIMEOUT_S``). A scrape reads the journal on its own connection
(agent/store/tallies.py), never on the event loop.

The address is bound as configured; the docs recommend loopback (the numbers say which
partitions are free, which GPUs failed and whether the node is cordoned: nothing secret, but
nothing a tenant needs either).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import structlog
from prometheus_client import CollectorRegistry, make_wsgi_app

from agent.config import split_host_port
from agent.errors import ConfigError

log = structlog.get_logger(__name__)

METRICS_PATH: Final = "/metrics"
# How often the server thread checks for shutdown, and how long one client may stall a request.
POLL_INTERVAL_S: Final = 0.1
REQUEST_TIMEOUT_S: Final = 10.0
SETTING: Final = "metrics.listen"

_App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` -> (host, port); ConfigError naming the setting."""
    return split_host_port(listen, SETTING)


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: a scrape every few seconds is not worth a log line."""


class _Server(ThreadingMixIn, WSGIServer):
    # Request threads are joined by server_close(): none outlives run().
    daemon_threads = False
    block_on_close = True


def _metrics_only(app: _App) -> _App:
    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"accelguard serves only {METRICS_PATH}\n".encode()]
        return app(environ, start_response)

    return serve


class MetricsServer:
    def __init__(self, listen: str, registry: CollectorRegistry) -> None:
        self._listen = listen
        self._host, self._port = parse_listen(listen)
        self._app = _metrics_only(make_wsgi_app(registry))
        # The address bound (with the port chosen when the setting says 0), once serving.
        self.address: tuple[str, int] | None = None
        self.serving = asyncio.Event()

    def _bind(self) -> _Server:
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(
                self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
        except (OSError, IndexError) as error:
            raise ConfigError(f"{SETTING}: cannot resolve {self._host!r}: {error}") from error
        server_class = type("_MetricsServer", (_Server,), {"address_family": family})
        try:
            server: _Server = server_class(sockaddr[:2], _Handler)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"{SETTING}: {self._listen} is already in use (another exporter, or a second "
                    "agent on this node?): choose another port or free it"
                ) from error
            raise ConfigError(f"{SETTING}: cannot listen on {self._listen}: {error}") from error
        server.set_app(self._app)
        return server

    async def run(self) -> None:
        server = self._bind()
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": POLL_INTERVAL_S},
            name="metrics-http",
        )  # fmt: skip
        thread.start()
        self.address = (self._host, server.server_port)
        log.info("metrics_serving", host=self._host, port=server.server_port, path=METRICS_PATH)
        self.serving.set()
        try:
            await asyncio.Future()  # serves until cancelled
        finally:
            self.serving.clear()
            # Off the event loop: shutdown waits for the serving thread's next poll, and
            # server_close for any request in flight.
            await asyncio.to_thread(_stop, server, thread)


def _stop(server: _Server, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join()
