"""The lease state machine's events, as link reports: ``partitions.context.PartitionEvents``
implemented over the outbox (``ReportSink``)."""

from __future__ import annotations

from agent.link.reports import ReportSink, lease_event, partition_event
from agent.store import LeaseRecord, PartitionRecord


class LinkEvents:
    def __init__(self, sink: ReportSink) -> None:
        self._sink = sink

    async def lease_changed(self, lease: LeaseRecord) -> None:
        await self._sink.publish(lease_event(lease))

    async def partition_changed(self, partition: PartitionRecord) -> None:
        await self._sink.publish(partition_event(partition))
