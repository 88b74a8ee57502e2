"""Link faults, each checked by counting: every report the node produced is stored at the
controller exactly once (seqs 1..last, no gap, no duplicate), whatever broke in between."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.link.support import Controller, LinkNode, TcpProxy, wait_for

FAST = {"heartbeat_s": 0.05, "backoff_base_s": 0.1, "backoff_cap_s": 1.0,
        "keepalive_time_s": 1.0, "keepalive_timeout_s": 1.0}  # fmt: skip


@pytest.fixture
def enrolled(controller: Controller, one_node: LinkNode) -> Iterator[LinkNode]:
    one_node.configure({"controller": controller.link_address, **FAST})
    one_node.agent.start()
    result = one_node.enroll(controller.token(one_node.node_id))
    assert result.returncode == 0, result.stderr
    return one_node


def _stored(controller: Controller, node: LinkNode) -> int:
    return len(controller.report_seqs(node.node_id))


def _attests(controller: Controller, node: LinkNode) -> int:
    return int(controller.query(
        "SELECT COUNT(*) FROM commands WHERE node_id = ? AND kind = 'attest'", node.node_id
    )[0][0])  # fmt: skip


def _producing(controller: Controller, node: LinkNode, more_than: int) -> None:
    wait_for(lambda: _stored(controller, node) > more_than, f"over {more_than} reports stored")


def _settle_and_count(controller: Controller, node: LinkNode) -> list[int]:
    """Stop producing (restart the agent with a slow heartbeat), wait until the outbox has
    nothing unacked, then compare what the node produced with what the controller holds."""
    if node.agent.process is not None:
        assert node.agent.stop(signal.SIGTERM) == 0
    node.configure({**FAST, "heartbeat_s": 3600.0})
    attests = _attests(controller, node)
    node.agent.start()

    def settled() -> bool:
        # The controller attests the node on every connect, and the node's answer is a report of
        # its own: settled means that answer is in too, then nothing unacked and all stored.
        open_ = controller.query(
            "SELECT COUNT(*) FROM commands WHERE node_id = ? AND state IN ('queued', 'sent')",
            node.node_id,
        )[0][0]
        return (
            _attests(controller, node) > attests
            and open_ == 0
            and node.unacked() == 0
            and _stored(controller, node) == node.last_seq()
        )

    wait_for(settled, "the reconnect's attestation answered and the outbox drained", timeout=90)
    assert node.unacked() == 0
    last = node.last_seq()
    assert node.meta("link_dropped") == 0
    seqs = controller.report_seqs(node.node_id)
    assert seqs == list(range(1, last + 1)), (len(seqs), last)
    rows = controller.query(
        "SELECT COUNT(*), COUNT(DISTINCT seq) FROM reports WHERE node_id = ?", node.node_id
    )
    assert rows[0][0] == rows[0][1] == last
    return seqs


def test_controller_sigkilled_mid_stream_and_restarted(
    controller: Controller, enrolled: LinkNode
) -> None:
    _producing(controller, enrolled, 40)
    controller.stop(signal.SIGKILL)
    offline_from = enrolled.last_seq()
    wait_for(lambda: enrolled.last_seq() > offline_from + 20, "reports produced offline")
    controller.start()
    _producing(controller, enrolled, offline_from + 20)
    _settle_and_count(controller, enrolled)


@pytest.mark.parametrize("cut", ["drop", "reset"])
def test_network_cut_by_proxy(controller: Controller, one_node: LinkNode, cut: str) -> None:
    proxy = TcpProxy(controller.link_port)
    try:
        one_node.configure({"controller": proxy.address, **FAST})
        one_node.agent.start()
        assert one_node.enroll(controller.token(one_node.node_id)).returncode == 0
        for round_ in range(3):
            _producing(controller, one_node, 30 * (round_ + 1))
            wait_for(lambda: proxy.connections() > 0, "a connection through the proxy")
            proxy.cut(reset=cut == "reset")
        _producing(controller, one_node, 120)
        _settle_and_count(controller, one_node)
    finally:
        proxy.close()


@pytest.mark.parametrize("direction", ["up", "down", "both"])
def test_network_stalled_by_proxy(
    controller: Controller, one_node: LinkNode, direction: str
) -> None:
    proxy = TcpProxy(controller.link_port)
    try:
        one_node.configure({"controller": proxy.address, **FAST})
        one_node.agent.start()
        assert one_node.enroll(controller.token(one_node.node_id)).returncode == 0
        _producing(controller, one_node, 30)
        proxy.stall(*(["up", "down"] if direction == "both" else [direction]))
        # Keepalive (1 s + 1 s here) declares the peer dead; the node dials again, through the
        # same stalled proxy, until the path heals.
        time.sleep(4)
        stored = _stored(controller, one_node)
        proxy.resume()
        _producing(controller, one_node, stored + 20)
        _settle_and_count(controller, one_node)
    finally:
        proxy.close()


def test_agent_sigkilled_with_unacked_reports(controller: Controller, one_node: LinkNode) -> None:
    proxy = TcpProxy(controller.link_port)
    try:
        one_node.configure({"controller": proxy.address, **FAST})
        one_node.agent.start()
        assert one_node.enroll(controller.token(one_node.node_id)).returncode == 0
        _producing(controller, one_node, 30)
        # Acks stop coming back: reports reach the controller but stay unacked on the node.
        proxy.stall("down")
        stored = _stored(controller, one_node)
        wait_for(lambda: _stored(controller, one_node) > stored + 10, "unacked reports stored")
        # Acks already on their way when the stall began may still land: wait for the node's own
        # count rather than assume it matches the controller's at this instant.
        wait_for(lambda: one_node.unacked() > 10, "more than ten reports unacked on the node")
        one_node.agent.stop(signal.SIGKILL)
        proxy.resume()
        # The restarted agent resends everything unacked; the controller keeps one copy of each.
        _settle_and_count(controller, one_node)
    finally:
        proxy.close()


def _backup(database: Path, destination: Path) -> None:
    with sqlite3.connect(database) as source, sqlite3.connect(destination) as target:
        source.backup(target)


def test_controller_restored_from_older_backup_is_refilled(
    controller: Controller, enrolled: LinkNode, tmp_path: Path
) -> None:
    node = enrolled
    _producing(controller, node, 20)
    backup = tmp_path / "controller-backup.db"
    _backup(controller.database, backup)
    backed_up = len(controller.query("SELECT 1 FROM reports"))
    # New never-dropped reports after the backup: a quarantine and clear means a new scrub
    # and a new signed certificate.
    partition = node.agent.partitions()[0]["uuid"]
    for verb in ("quarantine", "clear"):
        result = node.agent.cli("partition", verb, partition, "--reason", "backup test")
        assert result.returncode in (0, 3), result.stderr
    local_certificates = len(node.agent.cli_json("scrub", "certs")["certificates"])
    wait_for(
        lambda: len(controller.query("SELECT 1 FROM scrub_certificates")) == local_certificates,
        "the new certificate at the controller",
    )
    assert node.unacked() < 100
    controller.stop(signal.SIGKILL)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{controller.database}{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, controller.database)
    assert len(controller.query("SELECT 1 FROM scrub_certificates")) < local_certificates
    controller.start()
    # The node resends what the restored controller lacks: every retained never-dropped report.
    wait_for(
        lambda: len(controller.query("SELECT 1 FROM scrub_certificates")) == local_certificates,
        "certificates refilled from the node",
    )
    retained = {row[0] for row in node.outbox(
        "SELECT seq FROM link_outbox WHERE droppable = 0")}  # fmt: skip
    stored = set(controller.report_seqs(node.node_id))
    assert retained <= stored
    assert len(stored) >= backed_up
    duplicates = controller.query(
        "SELECT seq, COUNT(*) FROM reports WHERE node_id = ? GROUP BY seq HAVING COUNT(*) > 1",
        node.node_id,
    )
    assert duplicates == []
