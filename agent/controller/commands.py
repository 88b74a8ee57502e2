"""The controller's side of remote commands (docs/commands.md): sign, queue, deliver, collect.

A command is stored (with its exact signed bytes) before it is sent; it goes out on the node's
stream at once when the node is connected, and again on every reconnect until it has a result
or its ``not_after`` passes (the node's replay cache makes a second delivery harmless: it answers
with the stored result and acts once). A command with no result by ``not_after`` is
``expired``. Results arrive as CommandResult reports and are stored with the report
(agent/controller/store.py), then whoever waits is woken.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Final

import structlog
from google.protobuf.message import Message

from agent.controller.command_store import CommandRow, CommandState
from agent.controller.store import ControllerStore
from agent.link.envelope import CommandKey, new_envelope, sign_command
from agent.proto.accelguard.v1 import link_pb2 as pb
from agent.runtime.executor import BlockingExecutor

log = structlog.get_logger(__name__)

Send = Callable[[pb.Downlink], Awaitable[None]]
# The key to sign with for a node that pinned the key with this id ('' : the current key).
KeyFor = Callable[[str], CommandKey]
ResultHook = Callable[[CommandRow], Awaitable[None]]

EXPIRY_SWEEP_S: Final = 1.0
# A result may be on its way when not_after passes: the sweep waits this long after it.
RESULT_GRACE_S: Final = 5.0


class CommandDispatcher:
    def __init__(self, store: ControllerStore, executor: BlockingExecutor, keys: KeyFor) -> None:
        self._store = store
        self._executor = executor
        self._keys = keys
        self._senders: dict[str, Send] = {}
        self._waiters: dict[bytes, asyncio.Event] = {}
        # Called with a command's row once its result is stored, before waiters wake (the
        # attestation loop judges evidence here).
        self.result_hooks: list[ResultHook] = []

    def connected(self, node_id: str) -> bool:
        return node_id in self._senders

    async def issue(
        self, node_id: str, kind: str, body: Message, ttl_s: float, context: bytes = b""
    ) -> CommandRow:
        """Sign and store a command for ``node_id``, and send it if the node is connected."""
        envelope = new_envelope(node_id, ttl_s)
        getattr(envelope, kind).CopyFrom(body)
        trust = await self._executor.call(self._store.commands.trust, node_id)
        signed = sign_command(self._keys(trust.command_key_id), envelope)
        row = CommandRow(
            command_id=bytes(envelope.command_id),
            node_id=node_id,
            kind=kind,
            issued_at=envelope.issued_at,
            not_after=envelope.not_after,
            signed=signed.SerializeToString(),
            state=CommandState.QUEUED,
            delivered=False,
            finished_at=None,
            result=None,
            context=context,
        )
        self._waiters[row.command_id] = asyncio.Event()
        await self._executor.call(self._store.commands.add, row)
        log.info("command_issued", node=node_id, kind=kind, command=row.command_id.hex())
        await self._deliver(row)
        return row

    async def _deliver(self, row: CommandRow) -> None:
        send = self._senders.get(row.node_id)
        if send is None:
            return  # sent when the node connects, if still valid
        try:
            await send(pb.Downlink(command=pb.SignedCommand.FromString(row.signed)))
        except Exception as error:  # noqa: BLE001 - a broken stream: the reconnect re-delivers
            log.info("command_delivery_failed", node=row.node_id, error=str(error))
            return
        await self._executor.call(self._store.commands.mark_sent, row.command_id)

    async def node_connected(self, node_id: str, send: Send) -> None:
        """The node's stream is up: deliver what it has not answered yet, oldest first."""
        self._senders[node_id] = send
        rows = await self._executor.call(self._store.commands.open_for, node_id, time.time())
        for row in rows:
            await self._deliver(row)

    def node_disconnected(self, node_id: str, send: Send) -> None:
        if self._senders.get(node_id) is send:
            del self._senders[node_id]

    async def result_stored(self, command_id: bytes) -> None:
        """A CommandResult report for ``command_id`` was committed."""
        row = await self._executor.call(self._store.commands.get, command_id)
        if row is not None and row.result is not None:
            for hook in self.result_hooks:
                try:
                    await hook(row)
                except Exception:
                    log.exception("command_result_hook_failed", command=command_id.hex())
        self._wake(command_id)

    def _wake(self, command_id: bytes) -> None:
        event = self._waiters.get(command_id)
        if event is not None:
            event.set()

    async def wait(self, command_id: bytes, timeout_s: float) -> CommandRow | None:
        """The command's row once it has a result or expired, or as it is after ``timeout_s``."""
        event = self._waiters.setdefault(command_id, asyncio.Event())
        try:
            row = await self._executor.call(self._store.commands.get, command_id)
            if row is not None and row.state in (CommandState.QUEUED, CommandState.SENT):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout_s):
                        await event.wait()
                row = await self._executor.call(self._store.commands.get, command_id)
            return row
        finally:
            self._waiters.pop(command_id, None)

    async def run(self) -> None:
        """Mark commands expired once their not_after passed with no result."""
        while True:
            await asyncio.sleep(EXPIRY_SWEEP_S)
            try:
                expired = await self._executor.call(
                    self._store.commands.expire, time.time() - RESULT_GRACE_S
                )
            except Exception:
                log.exception("command_expiry_failed")
                continue
            for command_id in expired:
                log.warning("command_expired", command=command_id.hex())
                self._wake(command_id)
