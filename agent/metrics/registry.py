"""The agent's metrics: one private registry (never prometheus_client's global one, which
would also export whatever else in the process registered there) holding the collector that
reads the journal and the live sources, and the in-process histograms the admin handlers feed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, Histogram

from agent.metrics.collector import AgentCollector
from agent.metrics.sources import LiveSources

# A grant journals, fences and writes a CDI spec: milliseconds, seconds when the node is busy.
GRANT_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A release revokes, evicts and scrubs: it lasts as long as the scrub (deadline 600 s).
RELEASE_BUCKETS: Final = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                          1800.0)  # fmt: skip


class Metrics:
    """Built by the daemon from ``config.node.store_path``; ``registry`` goes to the
    :class:`~agent.metrics.server.MetricsServer`. The ``observe_*`` methods are safe from any
    thread and never block."""

    def __init__(self, journal: Path, sources: LiveSources | None = None) -> None:
        # auto_describe off: registering the collector must not read the journal.
        self.registry = CollectorRegistry(auto_describe=False)
        self._grants = Histogram(
            "accelguard_lease_grant_duration_seconds",
            "How long lease grants took, from the request to the lease being active.",
            buckets=GRANT_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self._releases = Histogram(
            "accelguard_lease_release_duration_seconds",
            "How long lease releases took: revoke, evict and scrub, to the partition's outcome.",
            buckets=RELEASE_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.registry.register(AgentCollector(journal, sources))

    def observe_grant(self, seconds: float) -> None:
        """A grant that returned an active lease took ``seconds``."""
        self._grants.observe(max(seconds, 0.0))

    def observe_release(self, seconds: float) -> None:
        """A release that reached its outcome (clean or quarantined) took ``seconds``."""
        self._releases.observe(max(seconds, 0.0))
