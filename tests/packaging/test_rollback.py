"""Rolling an upgrade back (docs/operations.md, "Upgrade"): an agent older than its journal's
schema refuses to start, in one line, and leaves the journal as it is; the state export taken
before the upgrade, imported with the older agent, brings the node back.

The upgrade is played by what a newer agent's migration leaves on disk: the journal's schema
version one ahead of this agent's MIGRATIONS, with a table this agent does not know.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from agent.sim.node import init_sim_node
from agent.store.migrations import MIGRATIONS
from tests.support import running_agent, wait_all_clean


def _schema(journal: Path) -> tuple[int, list[str]]:
    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    return version, tables


def test_an_older_agent_refuses_a_newer_journal_and_the_backup_rolls_back(tmp_path: Path) -> None:
    node = init_sim_node(tmp_path / "node", "h100x2", slice_bytes=1 << 20)
    with running_agent(node) as agent:
        agent.cli_json("layout", "apply", "--gpu", "0", "3g.40gb=2")
        wait_all_clean(agent)
        backup = tmp_path / "before-upgrade.agsb"
        exported = agent.cli("state", "export", str(backup))
        assert exported.returncode == 0, exported.stderr
        assert agent.stop() == 0

        journal = agent.config.node.store_path
        with contextlib.closing(sqlite3.connect(journal, isolation_level=None)) as db:
            db.execute("CREATE TABLE from_a_newer_agent (id INTEGER)")
            db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")

        agent.start(wait=False)
        assert agent.wait_exit(timeout=60) == 1
        log = agent.log()
        assert (
            f"accelguard: error: journal {journal} has schema version {len(MIGRATIONS) + 1}, "
            f"newer than this agent knows ({len(MIGRATIONS)}): upgrade the agent or restore a "
            "matching backup"
        ) in log
        assert "Traceback" not in log
        # Nothing migrated down, nothing dropped, no new journal in its place.
        version, tables = _schema(journal)
        assert version == len(MIGRATIONS) + 1
        assert "from_a_newer_agent" in tables and "partitions" in tables

        imported = agent.cli("state", "import", str(backup))
        assert imported.returncode == 0, imported.stderr
        agent.start()
        version, tables = _schema(journal)
        assert version == len(MIGRATIONS)
        assert "from_a_newer_agent" not in tables
        # The import fails closed (every partition scrubbed again), then the node is as before.
        wait_all_clean(agent)
        assert agent.cli("layout", "assert", "--gpu", "0", "3g.40gb=2").returncode == 0
        # The journal the import replaced is kept beside it.
        assert list(journal.parent.glob("pre-import-*"))
