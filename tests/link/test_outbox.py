"""The link outbox: bounded, with priorities, durable, and never losing a never-dropped report."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.errors import ConfigError, OutboxFullError
from agent.identity.node_key import NodeKey
from agent.link.reports import health_sample, lease_event, scrub_certificate
from agent.link.service import LinkService
from agent.proto.accelguard.v1 import link_pb2 as pb
from agent.runtime.executor import BlockingExecutor
from agent.store import MIGRATIONS, LeaseRecord, Store
from agent.store.outbox import Outbox, OutboxLimits
from tests.link.clients import signed_certificate

LIMITS = OutboxLimits(max_reports=10, max_bytes=1 << 20, grant_reserve=3, retention_s=3600)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "agent.db")


def _lease(state: str) -> bytes:
    record = LeaseRecord(
        id="lease-1", partition_uuid="GPU-1", tenant="t", cgroup="/c", state=state,
        created_at=1.0, expires_at=None, released_at=None, release_reason="",
    )  # fmt: skip
    return lease_event(record).SerializeToString()


def test_migration_adds_the_outbox(store: Store) -> None:
    assert store.schema_version == len(MIGRATIONS)
    outbox = Outbox(store, LIMITS)
    assert outbox.epoch() > 0
    assert outbox.last_seq() == 0


def test_health_samples_are_dropped_oldest_first_and_counted(store: Store) -> None:
    outbox = Outbox(store, LIMITS)
    seqs = [outbox.enqueue("health", b"h%d" % i, droppable=True) for i in range(10)]
    assert seqs == list(range(1, 11))
    assert outbox.enqueue("health", b"newest", droppable=True) == 11
    stats = outbox.stats()
    assert (stats.rows, stats.dropped, stats.dropped_with_seq) == (10, 1, 1)
    assert [e.seq for e in outbox.pending(0, 100)] == list(range(2, 12))


def test_never_dropped_reports_push_out_samples_then_are_refused(store: Store) -> None:
    outbox = Outbox(store, LIMITS)
    for _ in range(4):
        outbox.enqueue("health", b"h", droppable=True)
    for i in range(10):
        assert outbox.enqueue("scrub_certificate", b"c%d" % i, droppable=False) is not None
    assert outbox.stats().dropped == 4
    before = (outbox.last_seq(), [e.seq for e in outbox.pending(0, 100)])
    with pytest.raises(OutboxFullError, match="cannot store a lease report"):
        outbox.enqueue("lease", _lease("releasing"), droppable=False)
    # Nothing was written: same rows, same sequence space, and a sample is dropped, not queued.
    assert (outbox.last_seq(), [e.seq for e in outbox.pending(0, 100)]) == before
    assert outbox.enqueue("health", b"late", droppable=True) is None
    assert outbox.stats().dropped == 5
    # Reopened, the outbox knows its own state.
    reopened = Outbox(store, LIMITS)
    assert reopened.stats().rows == 10
    assert reopened.stats().unacked == 10


def test_a_grant_needs_the_reserve_a_release_does_not(store: Store) -> None:
    outbox = Outbox(store, LIMITS)
    for _ in range(7):
        outbox.enqueue("scrub_certificate", b"c", droppable=False)
    with pytest.raises(OutboxFullError, match="new grants need 3 reports of room"):
        outbox.enqueue("lease", _lease("granting"), droppable=False, opens_lease=True)
    # The events of leases already granted still fit.
    assert outbox.enqueue("lease", _lease("releasing"), droppable=False) == 8


def test_ack_keeps_never_dropped_reports_for_the_retention_window(store: Store) -> None:
    outbox = Outbox(store, LIMITS)
    outbox.enqueue("health", b"h", droppable=True)
    outbox.enqueue("scrub_certificate", b"c", droppable=False)
    outbox.enqueue("health", b"h", droppable=True)
    outbox.ack_through(2)
    stats = outbox.stats()
    assert (stats.rows, stats.unacked) == (2, 1)
    # A controller restored from a backup that holds nothing gets the retained one again.
    assert [e.seq for e in outbox.pending(0, 10)] == [2, 3]
    assert outbox.purge_expired() == 0
    # Acked long ago (another connection, as an operator's clock change would look).
    with sqlite3.connect(store.path) as other:
        other.execute("UPDATE link_outbox SET acked_at = 1.0 WHERE acked_at IS NOT NULL")
    assert outbox.purge_expired() == 1
    assert [e.seq for e in outbox.pending(0, 10)] == [3]


def test_acked_reports_make_room_before_samples_are_dropped(store: Store) -> None:
    outbox = Outbox(store, LIMITS)
    for _ in range(10):
        outbox.enqueue("scrub_certificate", b"c", droppable=False)
    outbox.ack_through(4)
    outbox.enqueue("lease", _lease("releasing"), droppable=False)
    assert outbox.stats().dropped == 0
    assert outbox.pending(0, 1)[0].seq == 2


def test_certificates_are_copied_from_the_journal_exactly_once(store: Store) -> None:
    outbox = Outbox(store, LIMITS)
    key = NodeKey.generate()
    for _ in range(3):
        store.add_certificate("GPU-test", None, True, signed_certificate(key, "node-a"))

    def convert(document: dict[str, object]) -> bytes:
        return scrub_certificate(document).SerializeToString()

    assert outbox.enqueue_new_certificates(convert) == 3
    assert outbox.enqueue_new_certificates(convert) == 0
    store.add_certificate("GPU-test", None, True, signed_certificate(key, "node-a"))
    assert outbox.enqueue_new_certificates(convert) == 1
    bodies = [pb.Report.FromString(e.body) for e in outbox.pending(0, 10)]
    assert [b.WhichOneof("body") for b in bodies] == ["scrub_certificate"] * 4


def test_publish_refuses_a_grant_with_a_clear_error_when_the_outbox_is_full(
    tmp_path: Path,
) -> None:
    config = parse_config(
        {
            "node": {"id": "node-a", "state_dir": str(tmp_path)},
            "link": {"controller": "127.0.0.1:9", "outbox_max_reports": 5,
                     "outbox_grant_reserve": 2},
        }
    )  # fmt: skip

    async def scenario() -> None:
        executor = BlockingExecutor()
        store = Store(tmp_path / "agent.db")
        try:
            link = LinkService(config, store, executor)
            for _ in range(3):
                await link.publish(
                    pb.Report(lease=pb.LeaseEvent(lease_id="l", partition_uuid="p", state="active"))
                )
            granting = pb.Report(
                lease=pb.LeaseEvent(lease_id="l2", partition_uuid="p", state="granting")
            )
            with pytest.raises(OutboxFullError) as refused:
                await link.publish(granting)
            assert "new grants need 2 reports of room" in str(refused.value)
            assert refused.value.exit_code == 75
            # Health samples keep flowing: dropped and counted, never an error.
            sample = health_sample(1.0, 0, 0)
            for _ in range(5):
                await link.publish(sample)
            assert link.outbox.stats().dropped >= 3
        finally:
            executor.shutdown()
            store.close()

    asyncio.run(scenario())


def test_link_config_refuses_a_reserve_that_admits_no_grant() -> None:
    with pytest.raises(ConfigError, match="outbox_grant_reserve: must be below"):
        parse_config({"link": {"outbox_max_reports": 10}})
    with pytest.raises(ConfigError, match=r"link\.controller: must be HOST:PORT"):
        parse_config({"link": {"controller": "no-port"}})
