"""``accelguard fences list|clear``: the device fences in the kernel, and removing them.

Fences outlive the agent: they are cgroup state (a v1 ``devices`` list, a v2 eBPF program), and
an agent that stops, or is uninstalled, leaves them where they are, so a stopped agent never opens
a partition to anyone. ``fences clear`` is for taking accelguard off a node (or off some tenant
cgroups) on purpose: it runs only while no agent holds the state directory, removes the fence
from each cgroup so that the cgroup gets the device access a new child of its parent would get,
and records each removal in the audit log as the operator's.

Which fences are ours: on cgroup v2 the programs carry our name, so every one under
``tenants.cgroup_parents`` is found; cgroup v1 has no owner mark, so only cgroups the journal
names in a lease are taken, and any other restricted v1 cgroup (a container runtime's) is listed
as "not ours" and left alone. A cgroup whose lease is still live is refused unless ``--force``:
release the lease first (that scrubs its partition). A fence removed by force under a live lease
is put back by the agent's next start, as any fence that drifted from the journal.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from agent.cli.output import add_output, print_json, print_table
from agent.config import Config, load_config
from agent.errors import AccelguardError, ExitCode, ValidationError


def add_parsers(commands: argparse._SubParsersAction[Any]) -> None:
    fences = commands.add_parser("fences", help="device fences in the kernel; removing them")
    verbs = fences.add_subparsers(dest="verb", required=True)
    listing = verbs.add_parser("list", help="every fence under tenants.cgroup_parents")
    add_output(listing)
    clear = verbs.add_parser(
        "clear", help="remove fences (the agent must be stopped): for uninstalling"
    )
    which = clear.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every fence of ours")
    which.add_argument("cgroups", nargs="*", default=[], metavar="CGROUP", help="these cgroups")
    clear.add_argument(
        "--force", action="store_true",
        help="also where a lease is still live (the agent re-applies it at its next start)",
    )  # fmt: skip
    add_output(clear)


def run(args: argparse.Namespace, config: Config | None = None) -> int:
    if config is None:
        config = load_config(args.config)
    parents = list(config.tenants.cgroup_parents)
    if not parents:
        raise ValidationError(
            "tenants.cgroup_parents is empty in the config: there is nowhere fences can be"
        )
    if args.verb == "list":
        return _list(args, config, parents)
    return _clear(args, config, parents)


def _journal_cgroups(config: Config) -> dict[str, list[Any]]:
    """cgroup -> its leases in the journal (every state), read-only; {} without a journal."""
    import sqlite3  # noqa: PLC0415

    from agent.errors import StoreError  # noqa: PLC0415

    path = config.node.store_path
    if not path.exists():
        return {}
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            db.execute("PRAGMA busy_timeout=5000")
            rows = db.execute("SELECT cgroup, id, state FROM leases ORDER BY created_at").fetchall()
        finally:
            db.close()
    except sqlite3.Error as error:
        raise StoreError(f"cannot read the journal at {path}: {error}") from error
    found: dict[str, list[Any]] = {}
    for cgroup, lease_id, state in rows:
        found.setdefault(cgroup, []).append((lease_id, state))
    return found


def _survey(config: Config, parents: list[Path]) -> list[dict[str, Any]]:
    from agent.isolation.rules import baseline_rules  # noqa: PLC0415
    from agent.isolation.survey import survey_fences  # noqa: PLC0415

    fences, problems = survey_fences(parents)
    journal = _journal_cgroups(config)
    baseline = set(baseline_rules())
    rows = []
    for fence in sorted(fences, key=lambda f: f.cgroup):
        leases = journal.get(fence.cgroup, [])
        live = [lease_id for lease_id, state in leases if state != "released"]
        allowed = fence.state.allowed
        rows.append({
            "cgroup": fence.cgroup,
            "mechanism": fence.state.mechanism,
            # v1 cannot mark its exceptions: a v1 fence is ours only where a lease explains it.
            "ours": fence.state.mechanism == "cgroup-v2-bpf" or bool(leases),
            "allowed": None if allowed is None else [str(r) for r in allowed if r not in baseline],
            "live_leases": live,
        })  # fmt: skip
    for problem in problems:
        rows.append({"cgroup": problem.cgroup, "mechanism": "unreadable", "ours": False,
                     "allowed": None, "live_leases": [], "error": problem.error})  # fmt: skip
    return rows


def _list(args: argparse.Namespace, config: Config, parents: list[Path]) -> int:
    rows = _survey(config, parents)
    if args.json:
        print_json({"fences": rows})
        return int(ExitCode.OK)
    table = [
        (
            row["cgroup"],
            row["mechanism"],
            "yes" if row["ours"] else "no",
            "unreadable" if row["allowed"] is None else (", ".join(row["allowed"]) or "baseline"),
            ", ".join(row["live_leases"]),
        )
        for row in rows
    ]
    print_table(("cgroup", "mechanism", "ours", "allows", "live leases"), table,
                empty="no fences under " + ", ".join(map(str, parents)))  # fmt: skip
    return int(ExitCode.OK)


def _clear(args: argparse.Namespace, config: Config, parents: list[Path]) -> int:
    from agent.isolation import fence_for  # noqa: PLC0415
    from agent.runtime.statedir import StateDirLock  # noqa: PLC0415
    from agent.store import Store  # noqa: PLC0415

    lock = StateDirLock(config.node.state_dir)
    # The running agent would see its fences vanish and quarantine; refuse while it runs.
    lock.acquire("fences clear")
    try:
        rows = _survey(config, parents)
        by_cgroup = {row["cgroup"]: row for row in rows}
        if args.all:
            chosen = [row for row in rows if row["ours"]]
        else:
            chosen = []
            for name in args.cgroups:
                row = by_cgroup.get(str(Path(name)))
                if row is None:
                    raise ValidationError(
                        f"{name}: no fence there under {', '.join(map(str, parents))} "
                        "(`accelguard fences list` shows them): nothing was removed"
                    )
                if not row["ours"]:
                    raise ValidationError(
                        f"{name}: a cgroup v1 device list no lease in the journal explains; it "
                        "may be a container runtime's, so it is left alone: nothing was removed"
                    )
                chosen.append(row)
        held = [row for row in chosen if row["live_leases"]]
        if held and not args.force:
            names = ", ".join(f"{row['cgroup']} ({', '.join(row['live_leases'])})" for row in held)
            raise ValidationError(
                f"live leases hold {names}: release them first (`accelguard lease release`, "
                "which scrubs their partitions), or pass --force (the agent re-applies their "
                "fences at its next start): nothing was removed"
            )
        store = Store(config.node.store_path) if config.node.store_path.exists() else None
        try:
            results = [_remove(row, fence_for(Path(row["cgroup"])), store) for row in chosen]
        finally:
            if store is not None:
                store.close()
    finally:
        lock.release()
    skipped = [row["cgroup"] for row in rows if not row["ours"]] if args.all else []
    failed = [r for r in results if r["outcome"] != "removed"]
    if args.json:
        print_json({"removed": [r for r in results if r["outcome"] == "removed"],
                    "failed": failed, "left_alone": skipped})  # fmt: skip
    else:
        for result in results:
            live = ""
            if result["live_leases"]:
                names = ", ".join(result["live_leases"])
                live = f" (live leases {names}: the agent re-applies it at its next start)"
            if result["outcome"] == "removed":
                print(f"removed the {result['mechanism']} fence on {result['cgroup']}{live}")
            else:
                print(f"FAILED on {result['cgroup']}: {result['error']}")
        for cgroup in skipped:
            print(
                f"left alone: {cgroup} (a cgroup v1 device list no lease in the journal explains)"
            )
        if not results and not skipped:
            print("no fences to remove", file=sys.stderr)
    return int(ExitCode.FAILED if failed else ExitCode.OK)


def _remove(row: dict[str, Any], fence: Any, store: Any) -> dict[str, Any]:
    """Remove one fence; its audit record (the operator's) in the journal, when there is one."""
    from agent.store.audit import Actor  # noqa: PLC0415

    cgroup = Path(row["cgroup"])
    result = {"cgroup": row["cgroup"], "mechanism": row["mechanism"],
              "live_leases": row["live_leases"]}  # fmt: skip
    try:
        fence.remove(cgroup)
    except AccelguardError as error:
        result |= {"outcome": "failed", "error": str(error)}
    else:
        result["outcome"] = "removed"
    if store is not None:
        store.audit(
            "fence.removed",
            outcome="ok" if result["outcome"] == "removed" else "failed",
            detail={k: v for k, v in result.items() if k != "outcome"},
            actor=Actor("operator", uid=os.getuid(), gid=os.getgid(), pid=os.getpid()),
        )
    return result
