"""A journal written through the store's own methods, the metrics server on a free loopback
port (its own event loop on a thread, as under the daemon), and what a scrape returns."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from agent.hw.health import GpuHealthReading
from agent.metrics.server import MetricsServer
from agent.metrics.sources import CallableSources, LinkState
from agent.scrub.model import PassResult, ScrubResult
from agent.store import PartitionRecord, Store
from agent.store.commands import CommandLog
from agent.store.health import HealthLog
from agent.store.outbox import Outbox, OutboxLimits

# Small enough that the tests can fill it.
OUTBOX_LIMITS = OutboxLimits(max_reports=4, max_bytes=1 << 20, grant_reserve=0, retention_s=3600)
_ids = itertools.count(1)


def partition(
    uuid: str, *, gpu_index: int = 0, state: str = "free", clean: bool = True
) -> PartitionRecord:
    return PartitionRecord(
        uuid=uuid,
        kind="mig",
        gpu_uuid=f"GPU-{gpu_index}",
        gpu_index=gpu_index,
        gi_id=1,
        ci_id=0,
        profile="1g.10gb",
        placement_start=0,
        placement_size=1,
        state=state,
        clean=clean,
        reason="" if clean else "test",
        present=True,
        updated_at=0.0,
        identity=f"GPU-{gpu_index}/{uuid}",
    )


@dataclass
class Journal:
    """The agent's journal, written as the daemon writes it."""

    store: Store

    def __post_init__(self) -> None:
        self.outbox = Outbox(self.store, OUTBOX_LIMITS)
        self.commands = CommandLog(self.store, self.outbox)
        self.health = HealthLog(self.store)

    def add_partitions(self, *records: PartitionRecord) -> None:
        known = self.store.partitions(present_only=False)
        self.store.sync_partitions([*known, *records])

    def lease_cycle(
        self, partition_uuid: str, *, tenant: str = "tenant-a", outcome: str = "clean"
    ) -> str:
        """Grant, activate and release a lease on a free, clean partition, which ends free and
        clean again (as a verified scrub leaves it) or quarantined (``outcome`` says which)."""
        lease_id = f"lease-{next(_ids)}"
        assert self.store.begin_grant(
            lease_id, partition_uuid, tenant, f"/sys/fs/cgroup/{tenant}", None
        )
        assert self.store.activate_lease(lease_id)
        self.store.begin_release(lease_id, "tenant done")
        self.store.finish_release(lease_id)
        if outcome == "clean":
            assert self.store.transition(partition_uuid, ("releasing",), "free", clean=True)
            self.store.set_lease_outcome(lease_id, "clean")
        else:
            self.store.set_partition_state(
                partition_uuid, "quarantined", clean=False, reason=outcome
            )
            self.store.set_lease_outcome(lease_id, f"quarantined: {outcome}")
        return lease_id

    def scrub(self, partition_uuid: str, *, seconds: float, error: str = "") -> None:
        size = 1 << 20
        result = ScrubResult(
            backend="simmem",
            policy="zero",
            total_bytes=size,
            passes=(PassResult(0, size, size, seconds / 2, seconds / 2, 1 if error else 0),),
        )
        self.store.record_scrub(
            partition_uuid, None, 1000.0, 1000.0 + seconds, not error, result.to_dict(), error
        )

    def refuse(self, reason: str) -> None:
        self.commands.refuse(next(_ids).to_bytes(16, "big"), reason, "test", b"report")


READINGS = [
    GpuHealthReading(
        index=0,
        uuid="GPU-0",
        at=1000.0,
        temperature_c=41,
        power_w=88.5,
        ecc_volatile_sbe=1,
        ecc_volatile_dbe=0,
        ecc_aggregate_sbe=7,
        ecc_aggregate_dbe=0,
        remapped_correctable=2,
        remapped_uncorrectable=0,
        remap_pending=False,
        remap_failure=False,
    ),
    # A GPU that fell off the bus: no counters, only that it was read.
    GpuHealthReading(index=1, uuid="GPU-1", at=1000.0, lost=True, error="GPU is lost"),
]
SOURCES = CallableSources(
    link=lambda: LinkState(connected=False, transport="grpc"),
    readings=lambda: READINGS,
    health=lambda: {"GPU-1": ("lost", True)},
)


def populate(journal: Journal) -> None:
    """Six partitions on two GPUs, five leases (each way one can end), four scrubs, two health
    events, a full outbox, a cordon."""
    journal.add_partitions(
        *(partition(f"MIG-{n}") for n in "abce"),
        partition("MIG-d", gpu_index=1),
        partition("MIG-q", state="quarantined", clean=False),
    )
    store = journal.store
    journal.lease_cycle("MIG-a")  # returned clean
    journal.lease_cycle("MIG-b", outcome="scrub failed")  # quarantined
    assert store.begin_grant("lease-live", "MIG-c", "tenant-c", "/sys/fs/cgroup/c", None)
    assert store.activate_lease("lease-live")
    assert store.begin_grant("lease-undone", "MIG-d", "tenant-d", "/sys/fs/cgroup/d", None)
    store.undo_grant("lease-undone", "fence failed")
    assert store.begin_grant("lease-lost", "MIG-e", "tenant-e", "/sys/fs/cgroup/e", None)
    assert store.activate_lease("lease-lost")
    assert store.lose_lease("lease-lost", "partition vanished")
    journal.scrub("MIG-a", seconds=0.05)
    journal.scrub("MIG-a", seconds=2.0)
    journal.scrub("MIG-b", seconds=3.0, error="scrub of MIG-b did not verify: 1 bytes differ")
    journal.scrub(
        "MIG-b",
        seconds=700.0,
        error="scrub worker for MIG-b hung past its 600s deadline and was killed",
    )
    journal.health.record(
        gpu_uuid="GPU-1",
        gpu_index=1,
        kind="lost",
        code=79,
        action="quarantine_gpu",
        detail="GPU 1 fell off the bus",
        partitions=["MIG-d"],
        hold=True,
        reset_required=True,
    )
    journal.health.record(
        gpu_uuid="GPU-0",
        gpu_index=0,
        kind="xid",
        code=13,
        action="lease_event",
        detail="XID 13",
        partitions=["MIG-c"],
        hold=False,
    )
    for _ in range(4):
        journal.outbox.enqueue("lease_event", b"x" * 10, droppable=False)
    assert journal.outbox.enqueue("health_sample", b"y", droppable=True) is None  # dropped
    journal.commands.set_cordoned(True, "maintenance")


@contextlib.contextmanager
def serve(registry: CollectorRegistry) -> Iterator[str]:
    """The metrics server on a free port, run as the daemon runs it: ``run()`` as a task of an
    event loop (on a thread here), cancelled at the end. Yields the /metrics URL."""
    server = MetricsServer("127.0.0.1:0", registry)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    tasks: list[asyncio.Task[None]] = []
    failure: list[BaseException] = []

    async def main() -> None:
        task = asyncio.create_task(server.run())
        tasks.append(task)
        serving = asyncio.create_task(server.serving.wait())
        await asyncio.wait({task, serving}, return_when=asyncio.FIRST_COMPLETED)
        serving.cancel()
        started.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def run() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as error:  # noqa: BLE001 - raised in the test below
            failure.append(error)
        finally:
            started.set()
            loop.close()

    thread = threading.Thread(target=run, name="metrics-test-loop")
    thread.start()
    started.wait(60)
    try:
        if failure:
            raise failure[0]
        assert server.address is not None, "the metrics server did not start"
        yield f"http://127.0.0.1:{server.address[1]}/metrics"
    finally:
        if thread.is_alive() and tasks:
            loop.call_soon_threadsafe(tasks[0].cancel)
        thread.join(60)
        assert not thread.is_alive(), "run() did not return after it was cancelled"
    if failure:
        raise failure[0]


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - http://127.0.0.1
        assert response.status == 200
        return str(response.read().decode())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def promtool(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )
