"""A session's reports in flight, and the watch that ends a session whose acks stopped coming.

Over gRPC, HTTP/2 keepalive finds a dead controller; over MQTT the broker answers for it, and a
controller restarted meanwhile knows no session of ours: it says "Hello again" once, on the first
report it sees. Should that word be lost, or a controller's stream be stuck while its pings are
still answered, reports would wait for acks for ever. So a session ends when reports it sent
have had no ack for longer than ``limit_s``; the next one says Hello, and its HelloReply says
where to resume (the outbox still holds every unacked report).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Final

from agent.errors import LinkError

# How often a session checks that its reports are acked.
ACK_CHECK_S: Final = 1.0


@dataclass
class Flight:
    """The highest report sent and acked in this session, and since when the oldest unacked
    one waits (or the last ack came)."""

    acked: int
    sent: int
    waiting_since: float = field(default_factory=time.monotonic)

    def sent_report(self, seq: int) -> None:
        if self.sent == self.acked:
            self.waiting_since = time.monotonic()
        self.sent = seq

    def heard(self) -> None:
        """An ack came: the controller holds this session (its clock restarts on receipt, not
        once the journal has recorded the ack)."""
        self.waiting_since = time.monotonic()


async def acks_come(flight: Flight, limit_s: float) -> None:
    """Return never; raise LinkError once sent reports have waited over ``limit_s``."""
    while True:
        await asyncio.sleep(min(ACK_CHECK_S, limit_s))
        waited = time.monotonic() - flight.waiting_since
        if flight.sent > flight.acked and waited > limit_s:
            raise LinkError(
                f"no ack for {waited:.0f} s with reports {flight.acked + 1}-{flight.sent} sent: "
                "the controller lost this session"
            )
