"""A command's result hooks (the attestation verdict, an uncordon's confirmation) run for the
result the controller keeps, not for a re-delivery's duplicate answer that arrives beside it,
and again for the same report sent after a lost ack (the controller may have stopped before its
hooks ran). On a real controller database, through the group committer."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from agent.controller.command_store import CommandOutcome, CommandRow, CommandState
from agent.controller.committer import ReportCommitter
from agent.controller.store import IncomingReport, NodeEnrollment, SqliteControllerStore
from agent.proto.accelguard.v1 import link_pb2 as pb
from agent.runtime.executor import BlockingExecutor

NODE = "node-r"
COMMAND = bytes(range(16))


def _report(seq: int, result: pb.CommandResult) -> IncomingReport:
    data = result.SerializeToString()
    body = pb.Report(seq=seq, command_result=result).SerializeToString()
    outcome = CommandOutcome(COMMAND, data, result.ok, result.refusal, result.error)
    return IncomingReport(NODE, 1, seq, "command_result", time.time(), body, command=outcome)


def test_only_the_kept_result_runs_the_hooks(tmp_path: Path) -> None:
    store = SqliteControllerStore(tmp_path / "controller.db")
    executor = BlockingExecutor()
    try:
        store.complete_enrollment(
            None,
            NodeEnrollment(
                node_id=NODE, spiffe_id=f"spiffe://t/node/{NODE}", attestation="attested",
                ek_public=b"", ek_certificate=b"", ak_public=b"", ak_name=b"",
                scrub_key_pem="", cert_serial="1", cert_not_after=0.0, agent_version="test",
            ),
        )  # fmt: skip
        now = time.time()
        store.commands.add(
            CommandRow(
                command_id=COMMAND, node_id=NODE, kind="uncordon", issued_at=now,
                not_after=now + 60, signed=b"", state=CommandState.SENT, delivered=True,
                finished_at=None, result=None, context=b"",
            )
        )  # fmt: skip
        first = pb.CommandResult(command_id=COMMAND, ok=True)
        # The node's answer to a re-delivery: the stored result, marked as a duplicate.
        duplicate = pb.CommandResult(command_id=COMMAND, ok=True, duplicate=True,
                                     refusal="replayed")  # fmt: skip

        async def commit() -> list[bool]:
            committer = ReportCommitter(store, executor, batch=8)
            runner = asyncio.create_task(committer.run())
            try:
                together = [committer.submit(_report(1, first)),
                            committer.submit(_report(2, duplicate))]  # fmt: skip
                kept = [await future for future in together]
                # The first report again (its ack was lost): its hooks may not have run.
                kept.append(await committer.submit(_report(1, first)))
                return kept
            finally:
                runner.cancel()

        assert asyncio.run(commit()) == [True, False, True]
        row = store.commands.get(COMMAND)
        assert row is not None and row.result == first.SerializeToString()
        assert row.state == CommandState.DONE
    finally:
        executor.shutdown()
        store.close()
