"""What a scrape says about a journal written through the store's own methods, served over HTTP
by the real server: the numbers, bounded label sets, counters that never go down, and scrub
failures classified from the error texts the real scrub runner writes."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.hw.health import GpuHealthReading
from agent.metrics import CallableSources, Metrics
from agent.metrics.collector import SCRUB_FAILURE_REASONS, scrub_failure_reason
from agent.runtime.failpoints import ENVIRONMENT_VARIABLE, CrashPoint, Fault
from agent.scrub.model import ScrubTarget
from agent.scrub.runner import ScrubRunner
from agent.store.commands import CommandLog
from tests.metrics.support import (
    SOURCES,
    Journal,
    fetch,
    partition,
    populate,
    samples,
    serve,
    value,
)


def test_a_scrape_reports_the_journal_and_the_live_state(journal: Journal) -> None:
    metrics = Metrics(journal.store.path, SOURCES)
    populate(journal)
    journal.refuse("signature")
    journal.refuse("expired")
    journal.refuse("expired")
    metrics.observe_grant(0.02)
    metrics.observe_grant(0.3)
    metrics.observe_release(4.0)
    with serve(metrics.registry) as url:
        text = fetch(url)

    assert value(text, "accelguard_journal_up") == 1
    partitions = {
        s: value(text, "accelguard_partitions", state=s)
        for s in ("free", "leased", "releasing", "scrubbing", "quarantined")
    }
    by_state = dict.fromkeys(partitions, 0)
    for record in journal.store.partitions():
        by_state[record.state] += 1
    assert (
        partitions
        == by_state
        == {"free": 2, "leased": 1, "releasing": 0, "scrubbing": 0, "quarantined": 3}
    )
    assert value(text, "accelguard_leases", state="active") == 1
    assert value(text, "accelguard_leases", state="granting") == 0
    assert value(text, "accelguard_leases_granted_total") == 4
    assert value(text, "accelguard_leases_ended_total", outcome="clean") == 1
    assert value(text, "accelguard_leases_ended_total", outcome="quarantined") == 1
    assert value(text, "accelguard_leases_ended_total", outcome="lost") == 1
    assert value(text, "accelguard_lease_grants_undone_total") == 1

    assert value(text, "accelguard_scrubs_total") == 4
    assert value(text, "accelguard_scrub_failures_total", reason="verification") == 1
    assert value(text, "accelguard_scrub_failures_total", reason="deadline") == 1
    assert value(text, "accelguard_scrub_failures_total", reason="hardware") == 0
    buckets = {
        le: value(text, "accelguard_scrub_duration_seconds_bucket", le=le)
        for le in ("0.1", "2.5", "5.0", "600.0", "1800.0", "+Inf")
    }
    assert buckets == {"0.1": 1, "2.5": 2, "5.0": 3, "600.0": 3, "1800.0": 4, "+Inf": 4}
    assert value(text, "accelguard_scrub_duration_seconds_count") == 4
    assert value(text, "accelguard_scrub_duration_seconds_sum") == pytest.approx(705.05)
    assert value(text, "accelguard_scrub_verified_bytes_total") == 2 * (1 << 20)

    assert (
        value(text, "accelguard_health_events_total", gpu="1", kind="lost", action="quarantine_gpu")
        == 1
    )
    assert (
        value(text, "accelguard_health_events_total", gpu="0", kind="xid", action="lease_event")
        == 1
    )
    assert value(text, "accelguard_health_holds") == len(journal.health.holds()) == 1

    stats = journal.outbox.stats()
    assert value(text, "accelguard_link_outbox_reports") == stats.rows == 4
    assert value(text, "accelguard_link_outbox_unacked_reports") == stats.unacked
    assert value(text, "accelguard_link_outbox_bytes") == stats.bytes
    assert value(text, "accelguard_link_reports_dropped_total") == stats.dropped >= 1
    oldest = value(text, "accelguard_link_outbox_oldest_unacked_timestamp_seconds")
    assert oldest == min(entry.created_at for entry in journal.outbox.pending(0, 100))
    assert value(text, "accelguard_node_cordoned") == 1
    assert value(text, "accelguard_command_refusals_total", reason="expired") == 2
    assert value(text, "accelguard_command_refusals_total", reason="signature") == 1
    assert value(text, "accelguard_command_refusals_journaled_total") == 3

    assert value(text, "accelguard_link_connected", transport="grpc") == 0
    assert value(text, "accelguard_link_connected", transport="mqtt") == 0
    assert value(text, "accelguard_gpu_info", gpu="0", uuid="GPU-0") == 1
    assert value(text, "accelguard_gpu_info", gpu="1", uuid="GPU-1") == 1
    assert value(text, "accelguard_gpu_temperature_celsius", gpu="0") == 41
    assert value(text, "accelguard_gpu_power_watts", gpu="0") == 88.5
    assert value(text, "accelguard_gpu_ecc_errors_total", gpu="0", severity="corrected") == 7
    assert value(text, "accelguard_gpu_remapped_rows_total", gpu="0", cause="correctable") == 2
    assert ("accelguard_gpu_temperature_celsius", (("gpu", "1"),)) not in samples(text)
    assert value(text, "accelguard_gpus_unhealthy") == 1
    assert value(text, "accelguard_gpu_healthy", gpu="0") == 1
    assert value(text, "accelguard_gpu_healthy", gpu="1") == 0
    assert value(text, "accelguard_gpu_health_state", gpu="1", state="lost") == 1
    assert value(text, "accelguard_gpu_reset_required", gpu="1") == 1

    assert value(text, "accelguard_lease_grant_duration_seconds_count") == 2
    assert value(text, "accelguard_lease_grant_duration_seconds_bucket", le="0.025") == 1
    assert value(text, "accelguard_lease_release_duration_seconds_bucket", le="5.0") == 1


def _series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return set(samples(text))


def test_label_values_stay_bounded_whatever_the_tenants(journal: Journal) -> None:
    """A hundred leases, each with its own tenant, cgroup and id, and scrub failures and health
    events each naming its partition: not one more series than after the first of each."""
    metrics = Metrics(journal.store.path, SOURCES)
    journal.add_partitions(*(partition(f"MIG-{n:03}") for n in range(100)))

    def round_for(n: int) -> None:
        uuid = f"MIG-{n:03}"
        journal.lease_cycle(
            uuid, tenant=f"tenant-{n:03}", outcome="clean" if n % 2 else f"scrub of {uuid} failed"
        )
        journal.scrub(uuid, seconds=n, error="" if n % 3 else f"partition {uuid}: CUDA error")
        journal.health.record(
            gpu_uuid="GPU-0",
            gpu_index=0,
            kind="xid",
            code=n % 7 + 1,
            action="lease_event",
            detail=f"XID on {uuid}",
            partitions=[uuid],
            hold=False,
        )
        journal.refuse("replayed")

    round_for(0)
    round_for(1)
    first = _series(generate_latest(metrics.registry).decode())
    for n in range(2, 100):
        round_for(n)
    text = generate_latest(metrics.registry).decode()
    assert _series(text) == first
    assert value(text, "accelguard_leases_granted_total") == 100
    labels = {v for _, pairs in _series(text) for _, v in pairs}
    leaked = {v for v in labels if re.search(r"tenant-|lease-\d|MIG-|/sys/fs/cgroup|XID on", v)}
    assert not leaked, f"unbounded label values: {sorted(leaked)}"


def _counters(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    kinds = {family.name: family.type for family in text_string_to_metric_families(text)}
    found = {}
    for (name, labels), number in samples(text).items():
        family = re.sub(r"(_total|_bucket|_count|_sum)$", "", name)
        if kinds.get(family) in ("counter", "histogram") and not name.endswith("_created"):
            found[(name, labels)] = number
    return found


def test_counters_never_go_down_as_the_journal_grows(journal: Journal) -> None:
    metrics = Metrics(journal.store.path, SOURCES)
    journal.add_partitions(partition("MIG-a"), partition("MIG-b"))
    store = journal.store

    def steps(live: str) -> list[Callable[[], object]]:
        return [
            lambda: journal.lease_cycle("MIG-a"),
            lambda: store.begin_grant(live, "MIG-b", "t", "/sys/fs/cgroup/t", None),
            lambda: store.activate_lease(live),
            lambda: store.begin_release(live, "done"),
            lambda: store.finish_release(live),  # ended, its outcome not written yet
            lambda: store.set_lease_outcome(live, "quarantined: scrub failed"),
            lambda: store.set_partition_state("MIG-b", "free", clean=True),  # cleared
            lambda: journal.scrub("MIG-a", seconds=1.0),
            lambda: journal.scrub("MIG-b", seconds=900.0, error="hung past its deadline"),
            lambda: journal.health.record(
                gpu_uuid="GPU-0",
                gpu_index=0,
                kind="ecc_dbe",
                code=1,
                action="quarantine_gpu",
                detail="dbe",
                partitions=[],
                hold=False,
            ),
            lambda: journal.refuse("future"),
            lambda: [journal.outbox.enqueue("sample", b"s", droppable=True) for _ in range(6)],
            lambda: metrics.observe_grant(0.5),
        ]

    before = _counters(generate_latest(metrics.registry).decode())
    rose = set()
    for step in [*steps("live-1"), *steps("live-2")]:
        step()
        after = _counters(generate_latest(metrics.registry).decode())
        for key, number in before.items():
            assert after.get(key, 0) >= number, f"{key} went down: {number} -> {after.get(key)}"
        rose |= {key[0] for key, number in after.items() if number > before.get(key, 0)}
        before = after
    for name in (
        "accelguard_leases_granted_total",
        "accelguard_leases_ended_total",
        "accelguard_scrubs_total",
        "accelguard_scrub_failures_total",
        "accelguard_scrub_duration_seconds_bucket",
        "accelguard_health_events_total",
        "accelguard_command_refusals_total",
        "accelguard_link_reports_dropped_total",
        "accelguard_lease_grant_duration_seconds_count",
    ):
        assert name in rose


def test_refusals_by_reason_count_from_start_and_trimmed_rows_as_unknown(
    journal: Journal,
) -> None:
    journal.refuse("signature")  # before the agent (re)started: journaled total only
    metrics = Metrics(journal.store.path)
    journal.refuse("wrong_node")
    text = generate_latest(metrics.registry).decode()
    assert value(text, "accelguard_command_refusals_journaled_total") == 2
    assert value(text, "accelguard_command_refusals_total", reason="signature") == 0
    assert value(text, "accelguard_command_refusals_total", reason="wrong_node") == 1
    # A flood between two scrapes: the table keeps its newest rows only, the rest is "unknown".
    flood = 1500
    with journal.store.transaction() as db:
        for n in range(flood):
            CommandLog._journal_refusal(db, n.to_bytes(16, "big"), "malformed", "flood")
    text = generate_latest(metrics.registry).decode()
    assert value(text, "accelguard_command_refusals_journaled_total") == 2 + flood
    malformed = value(text, "accelguard_command_refusals_total", reason="malformed")
    unknown = value(text, "accelguard_command_refusals_total", reason="unknown")
    assert malformed > 0
    assert unknown > 0
    assert malformed + unknown == flood


def test_an_unreadable_journal_is_reported_and_never_created(tmp_path: Path) -> None:
    missing = tmp_path / "state" / "agent.db"
    metrics = Metrics(missing, SOURCES)
    text = generate_latest(metrics.registry).decode()
    assert value(text, "accelguard_journal_up") == 0
    assert value(text, "accelguard_gpu_healthy", gpu="1") == 0  # the live metrics still come
    assert not missing.exists()


def test_a_failing_live_source_leaves_the_rest_of_the_scrape(journal: Journal) -> None:
    def readings() -> list[GpuHealthReading]:
        raise RuntimeError("dictionary changed size during iteration")

    sources = CallableSources(readings=readings, health=dict)
    text = generate_latest(Metrics(journal.store.path, sources).registry).decode()
    assert value(text, "accelguard_journal_up") == 1
    assert value(text, "accelguard_gpus_unhealthy") == 0
    assert "accelguard_gpu_temperature_celsius" not in text


def test_a_scrape_does_not_wait_for_the_daemons_write(journal: Journal) -> None:
    """WAL: the scrape reads the last committed snapshot while the daemon holds a write."""
    journal.add_partitions(partition("MIG-a"))
    metrics = Metrics(journal.store.path)
    with journal.store.transaction() as db:
        db.execute("UPDATE partitions SET state = 'quarantined' WHERE uuid = 'MIG-a'")
        text = generate_latest(metrics.registry).decode()
    assert value(text, "accelguard_journal_up") == 1
    assert value(text, "accelguard_partitions", state="free") == 1
    text = generate_latest(metrics.registry).decode()
    assert value(text, "accelguard_partitions", state="quarantined") == 1


# -- scrub failures, from the real runner's own error texts ---------------------------------------


def _scrub_error(tmp_path: Path, failpoint: str, deadline_s: float) -> str:
    """Run the real scrub runner (a worker process on simulated memory) with a failpoint set,
    and return what the sanitizer would journal as the scrub's error."""
    target = ScrubTarget(
        partition_uuid="MIG-x",
        gpu_uuid="GPU-0",
        gpu_index=0,
        kind="mig",
        visible_device="MIG-x",
        total_bytes=0,
        placement_start=0,
        placement_size=1,
    )
    options = {"memory_dir": str(tmp_path / "memory"), "slice_bytes": 1 << 16}
    runner = ScrubRunner("simmem", deadline_s, min_coverage=1.0, options=options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENVIRONMENT_VARIABLE, failpoint)
        try:
            outcome = asyncio.run(runner.scrub(target, "zero"))
        except Exception as error:  # noqa: BLE001 - the sanitizer journals str(error) too
            return str(error)
    assert outcome.failure is not None
    return outcome.failure


@pytest.mark.parametrize(
    ("failpoint", "deadline_s", "reason"),
    [
        (Fault.SCRUB_CORRUPT_AFTER_WRITE, 120.0, "verification"),
        (Fault.SCRUB_SHORT_COVERAGE, 120.0, "verification"),
        (Fault.SCRUB_WORKER_HANG, 2.0, "deadline"),
        (CrashPoint.SCRUB_WORKER_CRASH, 120.0, "hardware"),
    ],
)
def test_scrub_failures_are_classified_from_the_runners_errors(
    tmp_path: Path, journal: Journal, failpoint: str, deadline_s: float, reason: str
) -> None:
    error = _scrub_error(tmp_path, failpoint, deadline_s)
    assert scrub_failure_reason(error) == reason, error
    journal.add_partitions(partition("MIG-x"))
    journal.scrub("MIG-x", seconds=1.0, error=error)
    text = generate_latest(Metrics(journal.store.path).registry).decode()
    for known in SCRUB_FAILURE_REASONS:
        expected = 1 if known == reason else 0
        assert value(text, "accelguard_scrub_failures_total", reason=known) == expected


def test_unknown_error_texts_fall_in_other() -> None:
    assert scrub_failure_reason("") == "other"
    assert scrub_failure_reason("scrub worker for MIG-x printed no result: bad JSON") == "other"
    assert scrub_failure_reason("a process still using the partition?") == "evict"
