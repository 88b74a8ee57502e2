"""The health monitor: one service under the daemon (docs/health.md).

* **XIDs** come through one NVML event set registered before the agent accepts grants
  (:meth:`HealthMonitor.start`): an event set only receives what happens after it registered.
  Each is classified (agent/health/xid.py) and acts on exactly the partitions it names: the
  whole GPU for a fault that needs a reset, the GPU instance (and compute instance) NVML
  attributes it to on MIG, and, for an application-level XID, an event against the lease.
* **Counters and state** are polled every ``poll_interval_s``: a DBE count that rose, a row
  remap that failed or is pending, a GPU that fell off the bus or answers with errors. At start
  the counters are compared with the journal's last values, so what happened while the agent
  was down is found too.

Every event is journaled before anything acts on it, with a **hold** on each partition it
quarantines (agent/store/health.py): the quarantine survives restarts, and no scrub frees the
partition until an operator runs ``partition clear``. Then the event goes uplink.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import structlog

from agent.errors import AccelguardError
from agent.health.xid import Action, classify
from agent.hw.health import GpuHealthReading, XidEvent, XidWatcher, read_gpu_health
from agent.hw.nvml import NvmlBackend
from agent.runtime.executor import BlockingExecutor
from agent.store import PartitionRecord, Store
from agent.store.health import GpuCounters, HealthEventRecord, HealthHold, HealthLog

log = structlog.get_logger(__name__)

XID_WAIT_MS: Final = 500


class FaultSink(Protocol):
    """What the monitor asks of the lease service (``LeaseManager``)."""

    async def health_fault(self, partition_uuids: Sequence[str], reason: str) -> None: ...

    async def lease_health_event(self, partition_uuid: str, reason: str) -> None: ...


EventSink = Callable[[HealthEventRecord], Awaitable[None]]


@dataclass(frozen=True)
class HealthSettings:
    poll_interval_s: float = 10.0
    overrides: dict[int, Action] = field(default_factory=dict)


@dataclass
class GpuState:
    index: int
    uuid: str = ""
    lost: bool = False
    unreadable: bool = False
    remap_pending: bool = False
    reading: GpuHealthReading | None = None
    xids: Counter[str] = field(default_factory=Counter)  # by action


@dataclass(frozen=True)
class GpuReport:
    state: GpuState
    health: str  # healthy, failed, lost, unreadable
    reset_required: bool
    events: list[HealthEventRecord]


@dataclass(frozen=True)
class HealthReport:
    started: bool
    last_poll: float
    gpus: list[GpuReport]
    holds: list[HealthHold]


class HealthMonitor:
    def __init__(
        self,
        backend: NvmlBackend,
        store: Store,
        executor: BlockingExecutor,
        faults: FaultSink,
        settings: HealthSettings,
        events: EventSink | None = None,
    ) -> None:
        self._backend = backend
        self._store = store
        self._executor = executor
        self._faults = faults
        self._settings = settings
        self._events = events
        self.log = HealthLog(store)
        self._watcher = XidWatcher()
        self.gpus: dict[int, GpuState] = {}
        self.started = False
        self.last_poll = 0.0
        # GPU UUID -> (state, reset required) for every GPU that is not healthy.
        self._summary: dict[str, tuple[str, bool]] = {}

    # -- start-up: before grants -----------------------------------------------------------------

    async def start(self) -> None:
        """Register the XID event set and compare every GPU with the journal's last counters.
        The daemon awaits this before it serves the admin API."""
        count = await self._executor.call(self._backend.gpu_count)
        await self._executor.call(self._watcher.open, count)
        for index, error in self._watcher.unregistered.items():
            log.warning("xid_events_unavailable", gpu=index, error=error)
        self.gpus = {index: GpuState(index) for index in range(count)}
        await self.poll(at_start=True)
        self.started = True

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._xid_loop(), name="health-xid")
                group.create_task(self._poll_loop(), name="health-poll")
        finally:
            await self._executor.call(self._watcher.close)

    async def _xid_loop(self) -> None:
        while True:
            try:
                event = await asyncio.to_thread(self._watcher.wait, XID_WAIT_MS)
            except AccelguardError as error:
                log.error("xid_wait_failed", error=str(error))  # noqa: TRY400
                await asyncio.sleep(1.0)
                continue
            if event is not None:
                try:
                    await self.on_xid(event)
                except AccelguardError as error:
                    log.error("xid_handling_failed", xid=event.xid, error=str(error))  # noqa: TRY400

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.poll_interval_s)
            try:
                await self.poll(at_start=False)
            except AccelguardError as error:
                log.error("health_poll_failed", error=str(error))  # noqa: TRY400

    # -- XIDs ------------------------------------------------------------------------------------

    async def on_xid(self, event: XidEvent) -> None:
        partitions = await self._gpu_partitions(event.gpu_index)
        gpu_uuid = await self._gpu_uuid(event.gpu_index, partitions)
        attributed = event.gi_id is not None
        verdict = classify(event.xid, attributed, self._settings.overrides)
        action = verdict.action
        targets = [p.uuid for p in partitions]
        where = f"GPU {event.gpu_index}"
        if action in (Action.QUARANTINE_INSTANCE, Action.LEASE_EVENT) and attributed:
            named = [
                p.uuid
                for p in partitions
                if p.kind == "mig"
                and p.gi_id == event.gi_id
                and (event.ci_id is None or p.ci_id == event.ci_id)
            ]
            where += f" GI {event.gi_id}" + (
                f" CI {event.ci_id}" if event.ci_id is not None else ""
            )
            if named:
                targets = named
            elif action == Action.QUARANTINE_INSTANCE:
                # NVML named an instance this agent does not know: the whole GPU (fail closed).
                action = Action.QUARANTINE_GPU
                where += " (an instance this agent does not know: the whole GPU)"
        if action == Action.QUARANTINE_INSTANCE and not attributed:
            action = Action.QUARANTINE_GPU
        self.gpus.setdefault(event.gpu_index, GpuState(event.gpu_index)).xids[action] += 1
        detail = (
            f"XID {event.xid} ({verdict.mnemonic or 'not in the catalog'}; catalog action "
            f"{verdict.catalog_action or 'none'}) on {where}"
        )
        await self._act(
            gpu_index=event.gpu_index, gpu_uuid=gpu_uuid, kind="xid", code=event.xid,
            action=action, reset_required=verdict.reset_required, detail=detail,
            partitions=targets, gi_id=event.gi_id, ci_id=event.ci_id,
        )  # fmt: skip

    # -- counters and state ----------------------------------------------------------------------

    async def poll(self, *, at_start: bool) -> None:
        # Which partitions each GPU has, read once per poll (only their ids and GPUs are used).
        records = await self._executor.call(self._store.partitions)
        for index in sorted(self.gpus):
            state = self.gpus[index]
            reading = await self._executor.call(read_gpu_health, index, state.uuid)
            partitions = [p for p in records if p.gpu_index == index]
            await self._check(state, reading, partitions, at_start)
        self.last_poll = time.time()
        await self.refresh_summary()

    async def refresh_summary(self) -> None:
        """Recompute which GPUs are unhealthy: lost or unreadable now, or holding partitions
        for a health fault (until ``partition clear``)."""

        def compute() -> dict[str, tuple[str, bool]]:
            held = {hold.partition_uuid for hold in self.log.holds()}
            by_gpu: dict[str, bool] = {}
            for record in self._store.partitions(present_only=False):
                if record.uuid in held:
                    by_gpu[record.gpu_uuid] = True
            summary: dict[str, tuple[str, bool]] = {}
            for state in self.gpus.values():
                uuid = state.uuid
                if not uuid:
                    continue
                reset = self.log.reset_required(uuid)
                if reset and not by_gpu.get(uuid) and not (state.lost or state.unreadable):
                    # Every partition was cleared by the operator: the reset was done.
                    self.log.clear_reset_required(uuid)
                    reset = False
                if state.lost:
                    summary[uuid] = ("lost", True)
                elif state.unreadable:
                    summary[uuid] = ("unreadable", True)
                elif by_gpu.get(uuid):
                    summary[uuid] = ("failed", reset)
            return summary

        self._summary = await self._executor.call(compute)

    async def report(self, events_per_gpu: int) -> HealthReport:
        """What ``accelguard health`` shows: every GPU, its last events, the holds."""

        def collect() -> HealthReport:
            gpus = []
            for index in sorted(self.gpus):
                state = self.gpus[index]
                events = self.log.events(events_per_gpu, state.uuid) if state.uuid else []
                summary = self._summary.get(state.uuid, ("healthy", False))
                gpus.append(GpuReport(state, summary[0], summary[1], events))
            return HealthReport(self.started, self.last_poll, gpus, self.log.holds())

        return await self._executor.call(collect)

    def gpu_samples(self) -> list[tuple[str, float, float, int]]:
        """(UUID, temperature C, power W, XIDs seen) of every GPU last read (the heartbeat)."""
        samples = []
        for state in self.gpus.values():
            reading = state.reading
            if reading is None or not reading.readable or not state.uuid:
                continue
            samples.append(
                (
                    state.uuid,
                    float(reading.temperature_c or 0),
                    float(reading.power_w or 0.0),
                    sum(state.xids.values()),
                )
            )
        return samples

    def gpu_summary(self) -> dict[str, tuple[str, bool]]:
        """GPU UUID -> (state, reset required), unhealthy GPUs only (for the inventory)."""
        return dict(self._summary)

    async def _check(
        self,
        state: GpuState,
        reading: GpuHealthReading,
        partitions: list[PartitionRecord],
        at_start: bool,
    ) -> None:
        state.reading = reading
        state.uuid = reading.uuid or state.uuid or await self._gpu_uuid(state.index, partitions)
        targets = [p.uuid for p in partitions]

        async def fault(kind: str, code: int, detail: str) -> None:
            await self._act(
                gpu_index=state.index, gpu_uuid=state.uuid, kind=kind, code=code,
                action=Action.QUARANTINE_GPU, reset_required=True, detail=detail,
                partitions=targets,
            )  # fmt: skip

        if reading.lost:
            if not state.lost:
                state.lost = True
                await fault("lost", 79, f"GPU {state.index} fell off the bus: {reading.error}")
            return
        if reading.error:
            if not state.unreadable:
                state.unreadable = True
                await fault(
                    "unreadable", 0, f"GPU {state.index} answers health queries with errors: "
                    f"{reading.error}",
                )  # fmt: skip
            return
        state.lost = state.unreadable = False
        when = " (while the agent was not running)" if at_start else ""
        previous = await self._executor.call(self.log.counters, state.uuid)
        dbe = reading.ecc_aggregate_dbe or 0
        unc = reading.remapped_uncorrectable or 0
        failure = bool(reading.remap_failure)
        if previous is not None and dbe > previous.ecc_aggregate_dbe:
            await fault("ecc_dbe", dbe, f"GPU {state.index}: uncorrectable (DBE) ECC errors rose "
                        f"from {previous.ecc_aggregate_dbe} to {dbe}{when}")  # fmt: skip
        if failure and (previous is None or not previous.remap_failure):
            await fault("remap_failure", 1, f"GPU {state.index}: row remapping failed{when}")
        pending = bool(reading.remap_pending)
        if pending and not state.remap_pending:
            await fault("remap_pending", unc, f"GPU {state.index}: a row remap is pending (it "
                        "takes effect at the next GPU reset)")  # fmt: skip
        state.remap_pending = pending
        if previous is None or (dbe, unc, failure) != (
            previous.ecc_aggregate_dbe,
            previous.remapped_uncorrectable,
            previous.remap_failure,
        ):
            await self._executor.call(
                self.log.save_counters, GpuCounters(state.uuid, dbe, unc, failure, time.time())
            )

    # -- acting ----------------------------------------------------------------------------------

    async def _act(
        self,
        *,
        gpu_index: int,
        gpu_uuid: str,
        kind: str,
        code: int,
        action: Action,
        reset_required: bool,
        detail: str,
        partitions: list[str],
        gi_id: int | None = None,
        ci_id: int | None = None,
    ) -> None:
        quarantine = action in (Action.QUARANTINE_GPU, Action.QUARANTINE_INSTANCE)
        record = await self._executor.call(
            lambda: self.log.record(
                gpu_uuid=gpu_uuid, gpu_index=gpu_index, kind=kind, code=code, action=action,
                detail=detail, partitions=partitions, hold=quarantine,
                reset_required=reset_required and action == Action.QUARANTINE_GPU,
                gi_id=gi_id, ci_id=ci_id,
            )
        )  # fmt: skip
        emit = log.error if quarantine else log.warning
        emit("gpu_health_event", gpu=gpu_index, kind=kind, code=code, action=str(action),
             partitions=partitions, detail=detail)  # fmt: skip
        if self._events is not None:
            try:
                await self._events(record)
            except AccelguardError as error:
                log.error("health_event_not_reported", error=str(error))  # noqa: TRY400
        reason = f"GPU health: {detail}"
        if quarantine:
            await self._faults.health_fault(partitions, reason)
            await self.refresh_summary()
        elif action == Action.LEASE_EVENT:
            for uuid in partitions:
                await self._faults.lease_health_event(uuid, reason)

    async def _gpu_partitions(self, gpu_index: int) -> list[PartitionRecord]:
        records = await self._executor.call(self._store.partitions)
        return [p for p in records if p.gpu_index == gpu_index]

    async def _gpu_uuid(self, gpu_index: int, partitions: list[PartitionRecord]) -> str:
        state = self.gpus.get(gpu_index)
        if state is not None and state.uuid:
            return state.uuid
        return partitions[0].gpu_uuid if partitions else f"gpu-index-{gpu_index}"
