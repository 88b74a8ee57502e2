"""What the metrics need from the running daemon, beyond the journal: the consumer's small
interface (:class:`LiveSources`) and the one implementation the daemon builds from callables
(:class:`CallableSources`).

Every method is called on the metrics server's thread during a scrape, while the event loop
runs: it must return a snapshot (a copy, not a live view of a dict the loop mutates) and never
block or await. Each source is optional: ``None`` means "not known here" (the link is not
configured, the health monitor is off) and its metrics are left out of the scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from agent.hw.health import GpuHealthReading


class LinkState(NamedTuple):
    connected: bool
    # The transport in use, "grpc" or "mqtt" (a constant of the daemon's, never free text).
    transport: str


class LiveSources(Protocol):
    def link_state(self) -> LinkState | None:
        """The controller link now; None when the node has no link configured."""
        ...

    def gpu_readings(self) -> Sequence[GpuHealthReading] | None:
        """Each GPU's last health reading (``HealthMonitor.gpus[i].reading``); None when the
        health monitor is off."""
        ...

    def gpu_health(self) -> Mapping[str, tuple[str, bool]] | None:
        """GPU UUID -> (state, reset required) for every GPU that is not healthy, as
        ``HealthMonitor.gpu_summary()`` answers; None when the health monitor is off."""
        ...


@dataclass(frozen=True)
class CallableSources:
    """A :class:`LiveSources` from optional callables, e.g. in the daemon::

    CallableSources(
        link_state=lambda: LinkState(link.connected, "grpc"),
        gpu_readings=lambda: [s.reading for s in list(monitor.gpus.values()) if s.reading],
        gpu_health=monitor.gpu_summary,
    )
    """

    link: Callable[[], LinkState | None] | None = None
    readings: Callable[[], Sequence[GpuHealthReading]] | None = None
    health: Callable[[], Mapping[str, tuple[str, bool]]] | None = None

    def link_state(self) -> LinkState | None:
        return None if self.link is None else self.link()

    def gpu_readings(self) -> Sequence[GpuHealthReading] | None:
        return None if self.readings is None else self.readings()

    def gpu_health(self) -> Mapping[str, tuple[str, bool]] | None:
        return None if self.health is None else self.health()
