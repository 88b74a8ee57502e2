"""Prometheus metrics for the node (docs/metrics.md): layer 4, beside ``admin/`` and ``link/``.

``registry.py`` holds :class:`Metrics` (the private registry, the lease-duration histograms the
admin handlers feed), ``collector.py`` builds every other metric at scrape time from the journal
(read on a connection of its own: agent/store/tallies.py) and from the daemon's live state
(``sources.py``, the small interface the daemon implements), and ``server.py`` serves
``/metrics`` on ``[metrics] listen``.
"""

from __future__ import annotations

from agent.metrics.registry import Metrics
from agent.metrics.server import MetricsServer, parse_listen
from agent.metrics.sources import CallableSources, LinkState, LiveSources

__all__ = [
    "CallableSources",
    "LinkState",
    "LiveSources",
    "Metrics",
    "MetricsServer",
    "parse_listen",
]
