"""``accelguard state recover``: set a damaged journal aside so that the agent can start again.

It takes the agent's own state-directory lock, so it is refused while an agent runs. The next
agent starts a new journal with every partition quarantined.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from agent.config import Config, load_config
from agent.errors import ExitCode, StoreError


def add_parsers(commands: argparse._SubParsersAction[Any]) -> None:
    state = commands.add_parser("state", help="the agent's journal")
    state_verbs = state.add_subparsers(dest="verb", required=True)
    state_verbs.add_parser(
        "recover",
        help="set a corrupt journal aside; the agent then starts with every partition quarantined",
    )


def run(args: argparse.Namespace, config: Config | None = None) -> int:
    """Set a damaged journal aside, under the agent's own lock (refused while it runs)."""
    from agent.runtime.statedir import StateDirLock  # noqa: PLC0415

    if config is None:
        config = load_config(args.config)
    lock = StateDirLock(config.node.state_dir)
    lock.acquire("recovery")
    try:
        journal = config.node.store_path
        stamp = time.strftime("%Y%m%dT%H%M%S")
        moved = []
        for suffix in ("", "-wal", "-shm"):
            source = journal.with_name(journal.name + suffix)
            if source.exists():
                target = source.with_name(f"{journal.name}.damaged-{stamp}{suffix}")
                try:
                    source.rename(target)
                except OSError as error:
                    raise StoreError(f"cannot move {source} aside: {error.strerror}") from error
                moved.append(target)
    finally:
        lock.release()
    if not moved:
        print(f"no journal at {journal}: nothing to recover")
        return int(ExitCode.OK)
    for path in moved:
        print(f"kept {path}")
    print(
        "the next `accelguard agent` starts a new journal with every partition quarantined "
        "(the node's key is older than it); inspect, then `accelguard partition clear` each "
        "partition to scrub it"
    )
    return int(ExitCode.OK)
