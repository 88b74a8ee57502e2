"""Composition root: builds every service from the config and runs them under one TaskGroup.

Nothing starts in a constructor; ``Daemon.run`` starts the services, and SIGTERM/SIGINT cancel them
(a clean exit, status 0). Blocking library calls go through one executor thread.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any

import structlog

from agent.admin import AdminHandlers, AdminServer
from agent.config import Config
from agent.errors import AccelguardError
from agent.evict import Evictor
from agent.executor import BlockingExecutor
from agent.hw.devnodes import DeviceNodeMap
from agent.hw.nvml import NvmlBackend
from agent.inventory import InventoryService
from agent.layout import GpuLayoutResult, LayoutEngine, LayoutTarget
from agent.leases import LeaseManager
from agent.scrub.certificate import NodeKey
from agent.scrub.runner import ScrubRunner
from agent.store import Store
from agent.systemd import SystemdNotifier

log = structlog.get_logger("accelguard.daemon")


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.executor = BlockingExecutor()
        self.store = Store(config.node.store_path)
        self.backend = NvmlBackend(library=config.nvml.library, sim_dir=config.nvml.sim_dir)
        self.device_nodes = DeviceNodeMap(config.devices.dev_root, config.devices.proc_root)
        self.inventory = InventoryService(
            self.backend,
            self.store,
            self.device_nodes,
            self.executor,
            config.inventory.refresh_interval_s,
        )
        self.layout = LayoutEngine(self.backend, self.store)
        # The node's Ed25519 key signs scrub certificates; created 0600 on first start.
        self.node_key = NodeKey.load_or_create(config.node.state_dir / "node-key.pem")
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
            ),
            Evictor(config.leases.evict_grace_s),
            self.node_key,
        )
        self.notifier = SystemdNotifier()
        # Layout applies are serialised: two concurrent applies would plan against stale state.
        self._layout_lock = asyncio.Lock()
        self.admin = AdminServer(
            config,
            AdminHandlers(
                config, self.inventory, self.leases, self._run_layout, self.node_key.public_pem()
            ),
        )

    async def _run_layout(self, targets: list[LayoutTarget], apply: bool) -> list[GpuLayoutResult]:
        async with self._layout_lock:
            if not apply:
                pinned = await self.leases.pinned(dirty_too=False)
                return await self.executor.call(
                    lambda: self.layout.run(targets, apply=False, pinned=pinned)
                )
            # Invariant 5: a MIG instance is scrubbed before it is destroyed. Plan with only what
            # cannot be waited out pinned (leased, releasing, quarantined), scrub the dirty
            # instances the plan would destroy (waiting for scrubs already running), then apply
            # with everything that is not clean pinned.
            pinned = await self.leases.pinned(dirty_too=False, scrubbing_too=False)
            plan = await self.executor.call(
                lambda: self.layout.run(targets, apply=False, pinned=pinned)
            )
            doomed = {(r.gpu_uuid, i.gpu_instance_id) for r in plan for i in r.destroyed}
            for record in await self.leases.partitions():
                if (record.gpu_uuid, record.gi_id) in doomed and not record.clean:
                    await self.leases.sanitize(record.uuid)
            pinned = await self.leases.pinned(dirty_too=True)
            results = await self.executor.call(
                lambda: self.layout.run(targets, apply=True, pinned=pinned)
            )
            await self.inventory.refresh()
            self.leases.wake()
            return results

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
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, main.cancel)
        log.info("agent_starting", node=self.config.node.id, store=str(self.store.path))
        try:
            await self.executor.call(self.backend.open)
            await self.executor.call(self.layout.recover)
            async with asyncio.TaskGroup() as group:
                group.create_task(self.inventory.run(), name="inventory")
                group.create_task(self.admin.run(), name="admin")
                group.create_task(self.leases.run(), name="leases")
                group.create_task(
                    self.notifier.run(self.inventory.ready, self.inventory), name="systemd"
                )
                hotplug = self._hotplug()
                if hotplug is not None:
                    group.create_task(hotplug, name="hotplug")
        except asyncio.CancelledError:
            log.info("agent_stopping")
            self.notifier.notify("STOPPING=1")
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            try:
                await self.executor.call(self.backend.close)
            except AccelguardError as error:
                log.warning("nvml_shutdown_failed", error=str(error))
            await self.executor.call(self.store.close)
            self.executor.shutdown()
            log.info("agent_stopped")


def run_daemon(config: Config) -> int:
    daemon = Daemon(config)
    asyncio.run(daemon.run())
    return 0
