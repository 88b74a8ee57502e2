"""The node's metrics, built at each scrape from the journal and the daemon's live state
(docs/metrics.md lists every one).

Invariants:

- **Bounded labels.** Every label value comes from a fixed set named below, or is a GPU index
  or GPU UUID (bounded by the node's hardware), or a state/reason/action/kind of the lease
  state machine, the health monitor or the command checks, each mapped onto its fixed set
  (anything else becomes ``other``). Never a lease id, tenant, cgroup, partition UUID or free
  text.
- **Counters that only go up.** A journal counter is a count of rows that are never deleted
  (leases, scrubs, health events) or a number the journal only ever increases (the outbox's
  dropped count, the refusal table's AUTOINCREMENT sequence); so it survives agent restarts
  unchanged and resets only with the journal itself (``state recover``). The scrub duration
  histogram is such a count per bucket. Refusals by reason are the exception: the table keeps
  only its newest rows, so they are counted by this collector since the agent started (a
  process counter, reset by a restart like the in-process histograms).
- **A scrape never writes** and never shares the daemon's journal connection
  (agent/store/tallies.py); a journal that cannot be read is ``accelguard_journal_up 0`` and the
  live metrics are still served.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final, TypeVar

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from agent.errors import AccelguardError
from agent.health.xid import Action
from agent.hw.health import GpuHealthReading
from agent.link.envelope import RefusalReason
from agent.metrics.sources import LinkState, LiveSources
from agent.store import LeaseState, PartitionState
from agent.store.tallies import JournalTallies, read_tallies

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

OTHER: Final = "other"

# Upper bounds (seconds) of the scrub duration histogram's buckets: a MIG slice of simulated
# memory takes milliseconds, a whole H100 with the multi-pass policy minutes; the default
# deadline ([scrub] deadline_s) is 600 s.
SCRUB_DURATION_BUCKETS: Final = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                                 1800.0)  # fmt: skip

# Why a scrub failed, from its journaled error text: (class, phrases), first match wins. The
# phrases are those of agent/scrub/runner.py (verification, coverage, deadline, worker exit),
# agent/scrub/cuda (driver and device errors, the shared-memory check) and
# agent/partitions/sanitize.py (errors raised before the worker ran).
SCRUB_FAILURE_REASONS: Final = ("verification", "deadline", "evict", "hardware", OTHER)
_SCRUB_FAILURE_PHRASES: Final = (
    ("deadline", ("deadline",)),
    ("verification", ("did not verify", "below the configured minimum", "not proven clear")),
    # A scrub that found the partition still in use (CUDA could not allocate its memory).
    ("evict", ("evict", "still using the partition", "holder")),
    # A request this agent itself got wrong: not the hardware's fault.
    (OTHER, ("malformed", "unknown scrub", "printed no result")),
    # Not "gpu": a whole GPU's partition UUID is GPU-..., in every message about it.
    ("hardware", ("cuda", "nvml", "driver", "device", "memory file", "killed by signal",
                  "exited")),
)  # fmt: skip

# How a lease ended for its partition (the first word of its journaled outcome, see
# LeaseManager._record_outcome): returned clean, quarantined, or lost with the hardware.
LEASE_OUTCOMES: Final = ("clean", "quarantined", "lost")
_NOT_GRANTED: Final = "not granted"

LIVE_LEASE_STATES: Final = tuple(state.value for state in LeaseState if state.live)
PARTITION_STATES: Final = tuple(state.value for state in PartitionState)
REFUSAL_REASONS: Final = (*(reason.value for reason in RefusalReason), OTHER)
# Refusals whose journal rows were trimmed before a scrape read them (a flood of them).
TRIMMED_REFUSAL: Final = "unknown"

# The health monitor's event kinds and actions (agent/store/health.py, agent/health/monitor.py).
HEALTH_EVENT_KINDS: Final = ("xid", "ecc_dbe", "remap_failure", "remap_pending", "lost",
                             "unreadable", "temperature", "retired_pages")  # fmt: skip
HEALTH_ACTIONS: Final = (*(action.value for action in Action), "report")
GPU_HEALTH_STATES: Final = ("healthy", "failed", "lost", "unreadable")


def scrub_failure_reason(error: str) -> str:
    """The bounded class of a scrub failure's error text."""
    text = error.lower()
    for reason, phrases in _SCRUB_FAILURE_PHRASES:
        if any(phrase in text for phrase in phrases):
            return reason
    return OTHER


def lease_outcome(word: str) -> str | None:
    """The bounded class of an ended lease's outcome (its first word); None: never granted."""
    if word == _NOT_GRANTED:
        return None
    if word in ("clean", "lost"):
        return word
    # Anything else ("quarantined", or another state the release left the partition in) is a
    # partition not returned clean: LeaseManager._recorded_outcome reads it so.
    return "quarantined"


def _bounded(value: str, known: Sequence[str]) -> str:
    return value if value in known else OTHER


def _counts(known: Sequence[str], found: Mapping[str, int]) -> dict[str, int]:
    """Every known label value (zero when absent, so alerts see the series from the start),
    plus what was found mapped onto them."""
    counts = dict.fromkeys(known, 0)
    for value, count in found.items():
        label = _bounded(value, known)
        counts[label] = counts.get(label, 0) + count
    return counts


class AgentCollector:
    """A prometheus_client collector: ``collect()`` reads the journal and the live sources."""

    def __init__(self, journal: Path, sources: LiveSources | None = None) -> None:
        self._journal = journal
        self._sources = sources
        self._started_at = time.time()
        # Scrapes may overlap (one thread per request): the refusal cursor is shared state.
        self._lock = threading.Lock()
        self._refusal_cursor: int | None = None
        self._refusals: Counter[str] = Counter()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            tallies = self._read_journal()
            refusals = dict(self._refusals)
        up = GaugeMetricFamily(
            "accelguard_journal_up", "Whether this scrape could read the agent's journal (1) or "
            "not (0: the journal metrics are missing from it; see the agent's log).",
            value=0 if tallies is None else 1,
        )  # fmt: skip
        yield up
        gpus: dict[int, str] = {}
        if tallies is not None:
            yield from _journal_families(tallies, refusals)
            gpus.update(tallies.gpus)
        link: LinkState | None = None
        readings: Sequence[GpuHealthReading] | None = None
        health: Mapping[str, tuple[str, bool]] | None = None
        if self._sources is not None:
            link = _guarded("link_state", self._sources.link_state)
            readings = _guarded("gpu_readings", self._sources.gpu_readings)
            health = _guarded("gpu_health", self._sources.gpu_health)
        for reading in readings or ():
            gpus[reading.index] = reading.uuid or gpus.get(reading.index, "")
        yield _gpu_info(gpus)
        if link is not None:
            yield from _link_families(link)
        if readings is not None:
            yield from _reading_families(readings)
        if health is not None:
            yield from _health_families(gpus, health)

    def _read_journal(self) -> JournalTallies | None:
        try:
            tallies = read_tallies(
                self._journal,
                scrub_bounds=SCRUB_DURATION_BUCKETS,
                refusals_after=self._refusal_cursor,
                refusals_since=self._started_at,
            )
        except AccelguardError as error:
            log.warning("metrics_journal_unreadable", error=str(error))
            return None
        found = tallies.refusals
        for reason, count in found.new_by_reason.items():
            self._refusals[_bounded(reason, REFUSAL_REASONS)] += count
        if found.new_trimmed:
            self._refusals[TRIMMED_REFUSAL] += found.new_trimmed
        self._refusal_cursor = found.total
        return tallies


def _guarded(name: str, source: Callable[[], _T]) -> _T | None:
    try:
        return source()
    except Exception as error:  # noqa: BLE001 - a live source failing must not fail the scrape
        log.warning("metrics_source_failed", source=name, error=repr(error))
        return None


# -- the journal ----------------------------------------------------------------------------------


def _journal_families(tallies: JournalTallies, refusals: Mapping[str, int]) -> Iterator[Metric]:
    partitions = GaugeMetricFamily(
        "accelguard_partitions", "Partitions the hardware shows now, by lease-state-machine state.",
        labels=["state"],
    )  # fmt: skip
    for state, count in _counts(PARTITION_STATES, tallies.partitions).items():
        partitions.add_metric([state], count)
    yield partitions

    leases = GaugeMetricFamily("accelguard_leases", "Live leases by state.", labels=["state"])
    for state, count in _counts(LIVE_LEASE_STATES, tallies.live_leases).items():
        leases.add_metric([state], count)
    yield leases
    yield CounterMetricFamily(
        "accelguard_leases_granted", "Leases granted to a tenant (grants undone before the "
        "tenant could reach the partition are not counted).", value=tallies.leases_granted,
    )  # fmt: skip
    ended = CounterMetricFamily(
        "accelguard_leases_ended", "Leases that ended, by what happened to their partition: "
        "returned clean, quarantined, or lost with the hardware.", labels=["outcome"],
    )  # fmt: skip
    outcomes = dict.fromkeys(LEASE_OUTCOMES, 0)
    for word, count in tallies.lease_outcomes.items():
        outcome = lease_outcome(word)
        if outcome is not None:
            outcomes[outcome] += count
    for outcome, count in outcomes.items():
        ended.add_metric([outcome], count)
    yield ended
    yield CounterMetricFamily(
        "accelguard_lease_grants_undone", "Grants that failed before the tenant could reach the "
        "partition (it went back free and clean, untouched).",
        value=tallies.lease_outcomes.get(_NOT_GRANTED, 0),
    )  # fmt: skip

    scrubs = tallies.scrubs
    yield CounterMetricFamily("accelguard_scrubs", "Scrubs run, failed ones included.",
                              value=scrubs.count)  # fmt: skip
    failures = CounterMetricFamily(
        "accelguard_scrub_failures", "Scrubs that did not make their partition clean, by "
        "reason (verification, deadline, evict, hardware, other).", labels=["reason"],
    )  # fmt: skip
    by_reason = dict.fromkeys(SCRUB_FAILURE_REASONS, 0)
    for error, count in scrubs.failures.items():
        by_reason[scrub_failure_reason(error)] += count
    for reason, count in by_reason.items():
        failures.add_metric([reason], count)
    yield failures
    buckets = [
        (str(float(bound)), count)
        for bound, count in zip(SCRUB_DURATION_BUCKETS, scrubs.duration_buckets, strict=True)
    ]
    yield HistogramMetricFamily(
        "accelguard_scrub_duration_seconds", "How long scrubs took, failed ones included.",
        buckets=[*buckets, ("+Inf", scrubs.duration_count)], sum_value=scrubs.duration_sum_s,
    )  # fmt: skip
    yield CounterMetricFamily(
        "accelguard_scrub_verified_bytes", "Bytes of device memory proven clean by verified "
        "scrubs (written and read back by every pass).", value=scrubs.verified_bytes,
    )  # fmt: skip

    events = CounterMetricFamily(
        "accelguard_health_events", "GPU health events (XIDs, ECC, row remapping, lost GPUs) "
        "by GPU index, kind and the action taken.", labels=["gpu", "kind", "action"],
    )  # fmt: skip
    merged: Counter[tuple[str, str, str]] = Counter()
    for (index, kind, action), count in tallies.health_events.items():
        key = (str(index), _bounded(kind, HEALTH_EVENT_KINDS), _bounded(action, HEALTH_ACTIONS))
        merged[key] += count
    for labels, count in sorted(merged.items()):
        events.add_metric(list(labels), count)
    yield events
    yield GaugeMetricFamily(
        "accelguard_health_holds", "Partitions held quarantined by a GPU health fault until an "
        "operator clears them (`accelguard partition clear`).", value=tallies.health_holds,
    )  # fmt: skip

    outbox = tallies.outbox
    yield GaugeMetricFamily("accelguard_link_outbox_reports",
                            "Reports in the link outbox (unacked, and acked ones retained).",
                            value=outbox.reports)  # fmt: skip
    yield GaugeMetricFamily("accelguard_link_outbox_unacked_reports",
                            "Reports the controller has not acknowledged yet.",
                            value=outbox.unacked)  # fmt: skip
    yield GaugeMetricFamily("accelguard_link_outbox_bytes",
                            "Bytes of report bodies in the link outbox.",
                            value=outbox.bytes)  # fmt: skip
    if outbox.oldest_unacked_at is not None:
        yield GaugeMetricFamily(
            "accelguard_link_outbox_oldest_unacked_timestamp_seconds", "When the oldest report "
            "the controller has not acknowledged was written (absent when there is none).",
            value=outbox.oldest_unacked_at,
        )  # fmt: skip
    yield CounterMetricFamily(
        "accelguard_link_reports_dropped", "Droppable reports (health samples, refusals) "
        "dropped because the outbox was full.", value=outbox.dropped,
    )  # fmt: skip

    yield GaugeMetricFamily(
        "accelguard_node_cordoned", "Whether the node is cordoned (1): remote commands that "
        "grant are refused.", value=int(tallies.cordoned),
    )  # fmt: skip
    yield CounterMetricFamily(
        "accelguard_command_refusals_journaled", "Remote commands refused, ever (the journal's "
        "count; the table keeps only the newest rows).", value=tallies.refusals.total,
    )  # fmt: skip
    by_refusal = CounterMetricFamily(
        "accelguard_command_refusals", "Remote commands refused since the agent started, by "
        "reason (unknown: refused so fast that the journal trimmed the row before a scrape).",
        labels=["reason"],
    )  # fmt: skip
    for reason in (*REFUSAL_REASONS, TRIMMED_REFUSAL):
        by_refusal.add_metric([reason], refusals.get(reason, 0))
    yield by_refusal


# -- live sources ---------------------------------------------------------------------------------


def _link_families(link: LinkState) -> Iterator[Metric]:
    family = GaugeMetricFamily(
        "accelguard_link_connected", "Whether the controller link is connected (1) or not (0) "
        "over each transport (MQTT: the edge fallback, docs/edge.md).", labels=["transport"],
    )  # fmt: skip
    for transport in ("grpc", "mqtt"):
        family.add_metric([transport], int(link.connected and link.transport == transport))
    yield family


def _gpu_info(gpus: Mapping[int, str]) -> Metric:
    info = GaugeMetricFamily(
        "accelguard_gpu_info", "Each GPU this agent knows, by index, with its UUID (always 1): "
        "join on the gpu label.", labels=["gpu", "uuid"],
    )  # fmt: skip
    for index, uuid in sorted(gpus.items()):
        info.add_metric([str(index), uuid], 1)
    return info


def _reading_families(readings: Sequence[GpuHealthReading]) -> Iterator[Metric]:
    def gauge(name: str, help_text: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, help_text, labels=["gpu"])

    temperature = gauge("accelguard_gpu_temperature_celsius", "GPU core temperature.")
    power = gauge("accelguard_gpu_power_watts", "GPU power draw.")
    pending = gauge(
        "accelguard_gpu_remap_pending",
        "Whether a row remap is pending (it takes effect at the next GPU reset).",
    )
    failed = gauge("accelguard_gpu_remap_failed", "Whether row remapping failed on the GPU.")
    read_at = gauge("accelguard_gpu_reading_timestamp_seconds",
                    "When the health monitor last read the GPU.")  # fmt: skip
    ecc = CounterMetricFamily(
        "accelguard_gpu_ecc_errors", "ECC errors over the GPU's life (NVML aggregate counters), "
        "by severity (corrected: single-bit, uncorrected: double-bit).",
        labels=["gpu", "severity"],
    )  # fmt: skip
    ecc_volatile = CounterMetricFamily(
        "accelguard_gpu_ecc_volatile_errors", "ECC errors since the driver last loaded (NVML "
        "volatile counters), by severity.", labels=["gpu", "severity"],
    )  # fmt: skip
    remapped = CounterMetricFamily(
        "accelguard_gpu_remapped_rows", "Memory rows remapped, by the kind of error that caused "
        "it (correctable, uncorrectable).", labels=["gpu", "cause"],
    )  # fmt: skip
    retired = CounterMetricFamily(
        "accelguard_gpu_retired_pages", "Memory pages retired (GPUs before Ampere), by cause "
        "(sbe: multiple single-bit errors, dbe: a double-bit error).", labels=["gpu", "cause"],
    )  # fmt: skip
    nvlink = CounterMetricFamily(
        "accelguard_gpu_nvlink_errors", "NVLink replay, recovery and CRC errors, summed over the "
        "GPU's active links.", labels=["gpu"],
    )  # fmt: skip
    for reading in sorted(readings, key=lambda r: r.index):
        gpu = str(reading.index)
        read_at.add_metric([gpu], reading.at)
        for family, value in (
            (temperature, reading.temperature_c),
            (power, reading.power_w),
            (pending, reading.remap_pending),
            (failed, reading.remap_failure),
        ):
            if value is not None:
                family.add_metric([gpu], float(value))
        counters: tuple[tuple[CounterMetricFamily, str, int | None], ...] = (
            (ecc, "corrected", reading.ecc_aggregate_sbe),
            (ecc, "uncorrected", reading.ecc_aggregate_dbe),
            (ecc_volatile, "corrected", reading.ecc_volatile_sbe),
            (ecc_volatile, "uncorrected", reading.ecc_volatile_dbe),
            (remapped, "correctable", reading.remapped_correctable),
            (remapped, "uncorrectable", reading.remapped_uncorrectable),
            (retired, "sbe", reading.retired_pages_sbe),
            (retired, "dbe", reading.retired_pages_dbe),
        )
        for counter, label, count in counters:
            if count is not None:
                counter.add_metric([gpu, label], count)
        if reading.nvlink_errors is not None:
            nvlink.add_metric([gpu], reading.nvlink_errors)
    yield from (
        temperature,
        power,
        ecc,
        ecc_volatile,
        remapped,
        retired,
        nvlink,
        pending,
        failed,
        read_at,
    )


def _health_families(
    gpus: Mapping[int, str], health: Mapping[str, tuple[str, bool]]
) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "accelguard_gpus_unhealthy", "GPUs the health monitor finds failed, lost or unreadable.",
        value=len(health),
    )  # fmt: skip
    healthy = GaugeMetricFamily(
        "accelguard_gpu_healthy", "Whether the GPU is healthy (1) or failed, lost or unreadable "
        "(0).", labels=["gpu"],
    )  # fmt: skip
    reset = GaugeMetricFamily(
        "accelguard_gpu_reset_required", "Whether the GPU needs a reset before its partitions "
        "can be cleared.", labels=["gpu"],
    )  # fmt: skip
    states = GaugeMetricFamily(
        "accelguard_gpu_health_state", "The GPU's health state: 1 for the current one.",
        labels=["gpu", "state"],
    )  # fmt: skip
    for index, uuid in sorted(gpus.items()):
        state, reset_required = health.get(uuid, ("healthy", False))
        state = state if state in GPU_HEALTH_STATES else "failed"
        gpu = str(index)
        healthy.add_metric([gpu], int(state == "healthy"))
        reset.add_metric([gpu], int(reset_required))
        for known in GPU_HEALTH_STATES:
            states.add_metric([gpu, known], int(state == known))
    yield from (healthy, reset, states)
