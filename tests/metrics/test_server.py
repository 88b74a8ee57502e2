"""The metrics server as a service: it serves /metrics only, stops cleanly when its task is
cancelled (socket closed, every thread joined), and says clearly when its address is taken."""

from __future__ import annotations

import asyncio
import socket
import threading
import urllib.error
import urllib.request

import pytest

from agent.errors import ConfigError
from agent.metrics import Metrics, MetricsServer, parse_listen
from agent.runtime.net import free_port
from tests.metrics.support import Journal, fetch, serve, value


def _metrics_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "metrics-http"]


def test_it_serves_metrics_and_nothing_else(journal: Journal) -> None:
    with serve(Metrics(journal.store.path).registry) as url:
        assert value(fetch(url), "accelguard_journal_up") == 1
        with pytest.raises(urllib.error.HTTPError) as refused:
            fetch(url.removesuffix("/metrics") + "/")
        assert refused.value.code == 404
        refused.value.close()


def test_cancelling_run_closes_the_socket_and_joins_its_threads(journal: Journal) -> None:
    with serve(Metrics(journal.store.path).registry) as url:
        fetch(url)
        assert _metrics_threads()
        port = int(url.split(":")[2].split("/")[0])
    assert not _metrics_threads()
    with pytest.raises(urllib.error.URLError):
        fetch(url)
    with socket.socket() as again:  # nothing listens there any more (a restart can bind it)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()


def test_a_taken_port_is_a_config_error_naming_the_setting(journal: Journal) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MetricsServer(f"127.0.0.1:{port}", Metrics(journal.store.path).registry)
        taken_message = r"metrics\.listen: 127\.0\.0\.1:\d+ is already in use"
        with pytest.raises(ConfigError, match=taken_message):
            asyncio.run(server.run())
    assert not _metrics_threads()


def test_ipv6_loopback(journal: Journal) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as error:
        pytest.skip(f"no IPv6 loopback here: {error}")
    port = free_port()
    server = MetricsServer(f"[::1]:{port}", Metrics(journal.store.path).registry)

    async def scrape_once() -> str:
        task = asyncio.create_task(server.run())
        await server.serving.wait()
        text = await asyncio.to_thread(fetch, f"http://[::1]:{port}/metrics")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return text

    assert value(asyncio.run(scrape_once()), "accelguard_journal_up") == 1
    assert not _metrics_threads()


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_listen_addresses(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["9464", ":9464", "127.0.0.1:", "127.0.0.1:http", "h:70000"])
def test_bad_listen_addresses_name_the_setting(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"metrics\.listen: .* is not HOST:PORT"):
        parse_listen(listen)
