"""Composition root: builds every service from the config and runs them under one TaskGroup.

Nothing starts in a constructor; ``Daemon.run`` starts the services, and SIGTERM/SIGINT cancel them
(a clean exit, status 0). Blocking library calls go through one executor thread.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

import structlog

from agent.admin.handlers import AdminHandlers
from agent.admin.server import AdminServer
from agent.audit.trail import AuditService
from agent.config import Config
from agent.errors import AccelguardError
from agent.health.monitor import HealthMonitor, HealthSettings
from agent.health.npu import NpuHealthMonitor
from agent.health.xid import parse_overrides
from agent.hw.devnodes import DeviceNodeMap
from agent.hw.nvml import NvmlBackend
from agent.hw.sources import node_backends
from agent.identity.node_key import NODE_KEY_FILE, NodeKey
from agent.identity.tls import IdentityPaths
from agent.isolation.evict import Evictor
from agent.link.attestation import TpmAttester
from agent.link.commands import CommandKeyring, CommandService
from agent.link.events import LinkEvents
from agent.link.reports import health_event
from agent.link.service import LinkService
from agent.metrics import CallableSources, LinkState, Metrics, MetricsServer
from agent.partitions.desired import DesiredLayoutService
from agent.partitions.hooks import LayoutHooks
from agent.partitions.inventory import InventoryService
from agent.partitions.layout import LayoutEngine
from agent.partitions.layout_service import LayoutService
from agent.partitions.leases import LeaseManager
from agent.partitions.npu_layout import NpuLayoutEngine
from agent.runtime import failpoints
from agent.runtime.executor import BlockingExecutor
from agent.runtime.failpoints import Fault
from agent.runtime.statedir import StateDirLock
from agent.runtime.systemd import SystemdNotifier
from agent.runtime.tasks import watch_stop
from agent.scrub.runner import ScrubRunner
from agent.store import Store
from agent.store.commands import JOURNAL_LOST_AT, CommandLog
from agent.store.health import HealthEventRecord

log = structlog.get_logger(__name__)

# Seconds a stop may take before the tasks still running are logged and cancelled once more, and
# again before the process exits anyway: twice this stays within the unit's TimeoutStopSec (30 s).
STOP_OVERDUE_S: Final = 10.0


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        # First, before anything is opened or created: one agent per state directory.
        self.state_lock = StateDirLock(config.node.state_dir)
        self.state_lock.acquire()
        try:
            self._build(config)
        except BaseException:
            self.state_lock.release()
            raise

    def _build(self, config: Config) -> None:
        self.executor = BlockingExecutor()
        key_path = config.node.state_dir / NODE_KEY_FILE
        # The node key is made on the first start together with the journal: a journal created
        # when the key already exists was lost (deleted, emptied) and must not mean "all clean".
        node_existed = key_path.exists()
        self.store = Store(config.node.store_path)
        journal_lost = node_existed and self.store.created
        if journal_lost:
            # The replay cache went with it: commands issued before now are refused.
            self.store.set_meta(JOURNAL_LOST_AT, repr(time.time()))
        # NVML (or NoNvidia), and DCMI and /dev/accel where the config turns them on.
        self.backends = node_backends(config)
        self.backend = self.backends.nvml
        self.device_nodes = DeviceNodeMap(config.devices.dev_root, config.devices.proc_root)
        self.inventory = InventoryService(
            self.backends.sources,
            self.store,
            self.device_nodes,
            self.executor,
            config.inventory.refresh_interval_s,
            accel=self.backends.accel,
        )
        self.layout = LayoutEngine(self.backend, self.store)
        # The node's Ed25519 key signs scrub certificates; created 0600 on first start.
        self.node_key = NodeKey.load_or_create(key_path)
        # The controller link, only where [link] controller is set; lease and partition
        # transitions go to its outbox.
        self.link: LinkService | None = None
        if config.link.controller:
            self.link = LinkService(config, self.store, self.executor, self.inventory)
        self.leases = LeaseManager(
            config,
            self.store,
            self.executor,
            self.inventory,
            self.backend,
            ScrubRunner(
                config.scrub.backend,
                config.scrub.deadline_s,
                config.scrub.min_coverage,
                config.scrub.shared_memory,
                options={"memory_dir": config.sim.memory_dir, "slice_bytes": config.sim.slice_bytes}
                if config.scrub.backend == "simmem"
                else None,
            ),
            Evictor(config.leases.evict_grace_s, census=config.leases.census),
            self.node_key,
            events=LinkEvents(self.link) if self.link is not None else None,
        )
        self.leases.journal_lost = journal_lost
        self.inventory.on_sync.append(self.leases.on_inventory_sync)
        self.notifier = SystemdNotifier()
        self.layouts = LayoutService(
            self.layout, self.leases, self.inventory, self.executor, self.store,
            LayoutHooks(config.layout.before_apply, config.layout.after_apply,
                        config.layout.hook_timeout_s),
            node_id=config.node.id,
            npu_engine=NpuLayoutEngine(self.backends.ascend, self.store),
        )  # fmt: skip
        # The desired layout the last applies recorded: shown, forgotten, re-applied at start.
        self.desired = DesiredLayoutService(
            self.store, self.executor, self.inventory, self.layouts,
            reapply_at_start=config.layout.reapply_at_start,
        )  # fmt: skip
        # GPU health: XIDs, ECC, row remapping, lost GPUs; faults quarantine through the leases.
        self.health: HealthMonitor | None = None
        # Through NVML only: an NPU-only node has no GPU health monitor (docs/npu.md).
        if config.health.enabled and isinstance(self.backend, NvmlBackend):
            overrides = parse_overrides(
                dict(item.split("=", 1) for item in config.health.xid_overrides)
            )
            self.health = HealthMonitor(
                self.backend,
                self.store,
                self.executor,
                self.leases.faults,
                HealthSettings(config.health.poll_interval_s, overrides),
                events=self._health_events(),
            )
            if self.link is not None:
                self.link.health = self.health
        # NPU health through DCMI (docs/npu.md): faults quarantine like GPU faults.
        self.npu_health: NpuHealthMonitor | None = None
        if config.health.enabled and self.backends.ascend is not None:
            self.npu_health = NpuHealthMonitor(
                self.backends.ascend, self.store, self.executor, self.inventory,
                self.leases.faults, config.health.poll_interval_s,
            )  # fmt: skip
        # The Prometheus endpoint, where [metrics] listen is set (docs/metrics.md).
        self.metrics: Metrics | None = None
        self.metrics_server: MetricsServer | None = None
        if config.metrics.listen:
            self.metrics = Metrics(config.node.store_path, self._metric_sources())
            self.metrics_server = MetricsServer(config.metrics.listen, self.metrics.registry)
        handlers = AdminHandlers(
            config,
            self.inventory,
            self.leases,
            self.layouts.run,
            self.node_key.public_pem(),
            health=self.health,
            latencies=self.metrics,
            link=self.link,
            desired=self.desired,
        )
        # The audit log's checkpoints, rotation and the agent's own start and stop
        # (the records themselves are written by the journal, agent/store/audit.py).
        self.audit = AuditService(
            config,
            self.store,
            self.executor,
            self.node_key,
            outbox=self.link.outbox if self.link is not None else None,
            wake=self.link.wake if self.link is not None else None,
        )
        self.admin = AdminServer(config, handlers, self.store, self.executor)
        # Remote commands run through the same handlers as the admin socket's calls.
        self.commands: CommandService | None = None
        if self.link is not None:
            link = self.link
            self.commands = CommandService(
                config.node.id,
                CommandLog(self.store, link.outbox),
                self.executor,
                handlers,
                CommandKeyring(IdentityPaths(config.link.cert_dir).command_key),
                TpmAttester(config.attest, self.executor),
                wake=link.wake,
                renew_certificate=link.request_renewal,
                clock_skew_s=config.link.command_clock_skew_s,
            )
            link.commands = self.commands

    def _metric_sources(self) -> CallableSources:
        """Live numbers for a scrape; each runs on the metrics server's thread and returns a
        copy, never blocking."""
        link, health = self.link, self.health
        return CallableSources(
            link=(lambda: LinkState(link.connected, link.transport)) if link is not None else None,
            readings=(
                (lambda: [s.reading for s in list(health.gpus.values()) if s.reading is not None])
                if health is not None
                else None
            ),
            health=health.gpu_summary if health is not None else None,
        )

    def _health_events(self) -> Callable[[HealthEventRecord], Awaitable[None]] | None:
        link = self.link
        if link is None:
            return None

        async def publish(record: HealthEventRecord) -> None:
            await link.publish(health_event(record))

        return publish

    def _hotplug(self) -> Coroutine[Any, Any, None] | None:
        if not self.config.hotplug.enabled:
            return None
        from agent.hw.hotplug import HotplugEvent, HotplugFilter, HotplugMonitor  # noqa: PLC0415

        settings = self.config.hotplug
        accelerators = HotplugFilter(
            subsystems=frozenset(settings.subsystems),
            pci_vendor_ids=frozenset(int(v, 16) for v in settings.pci_vendor_ids) or None,
            pci_class_prefixes=frozenset(settings.pci_class_prefixes) or None,
        )

        async def on_event(event: HotplugEvent) -> None:
            log.info(
                "hotplug_event", action=event.action, subsystem=event.subsystem,
                device=event.sys_path,
            )  # fmt: skip
            self.inventory.refresh_soon()

        monitor = HotplugMonitor(on_event, accelerators)
        return monitor.run()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        if main is None:  # pragma: no cover - run() is always awaited inside a task
            raise RuntimeError("Daemon.run must run inside a task")
        stopping = False

        def stop() -> None:
            nonlocal stopping
            if not stopping:
                stopping = True
                watch_stop(main, STOP_OVERDUE_S)
            main.cancel()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop)
        # Every line the agent logs from here on names its node.
        structlog.contextvars.bind_contextvars(node=self.config.node.id)
        log.info("agent_starting", store=str(self.store.path))
        try:
            await self.audit.started(journal_lost=self.leases.journal_lost)
            await self.executor.call(self.backends.open)
            await self.executor.call(self.layout.recover)
            if self.health is not None:
                # The XID event set is registered before anything can be granted: an event set
                # only receives what happens after it registered.
                await self.health.start()
            async with asyncio.TaskGroup() as group:
                group.create_task(self.inventory.run(), name="inventory")
                group.create_task(self.admin.run(), name="admin")
                group.create_task(self.leases.run(), name="leases")
                # After the leases' start-up reconciliation (fail closed first), once.
                group.create_task(self.desired.run(self.leases.ready), name="desired layout")
                group.create_task(self.audit.run(), name="audit")
                group.create_task(
                    self.notifier.run(self.inventory.ready, self.inventory), name="systemd"
                )
                if self.link is not None:
                    group.create_task(self.link.run(), name="link")
                if self.health is not None:
                    group.create_task(self.health.run(), name="health")
                if self.npu_health is not None:
                    group.create_task(self.npu_health.run(), name="npu health")
                if self.metrics_server is not None:
                    group.create_task(self.metrics_server.run(), name="metrics")
                hotplug = self._hotplug()
                if hotplug is not None:
                    group.create_task(hotplug, name="hotplug")
                if failpoints.active(Fault.STOP_CLEANUP_HANGS):
                    group.create_task(_cleanup_that_hangs(), name="fault: clean-up hangs")
        except asyncio.CancelledError:
            log.info("agent_stopping")
            self.notifier.notify("STOPPING=1")
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            try:
                await self.audit.stopping()
            except AccelguardError as error:
                log.warning("audit_stop_not_recorded", error=str(error))
            try:
                await self.executor.call(self.backends.close)
            except AccelguardError as error:
                log.warning("backend_shutdown_failed", error=str(error))
            await self.executor.call(self.store.close)
            self.executor.shutdown()
            log.info("agent_stopped")
            self.state_lock.release()


async def _cleanup_that_hangs() -> None:
    """Fault hook: a task whose clean-up waits for ever, as a library's exit waiting for a peer's
    answer that never comes does; the first cancellation is spent in it."""
    try:
        await asyncio.Event().wait()
    finally:
        await asyncio.Event().wait()


def run_daemon(config: Config) -> int:
    daemon = Daemon(config)
    asyncio.run(daemon.run())
    return 0
