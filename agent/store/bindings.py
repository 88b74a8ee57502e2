"""Binding a lease granted without a cgroup (``lease grant --bind-later``, a Slurm job's lease
granted by its Prolog before the job's cgroup exists) to the cgroup it gets later.

Invariants: only an active, unbound lease is bound, once; the row changes in one transaction
with its audit record (``lease.bound``), before the fence is applied (journal first).
"""

from __future__ import annotations

import time

from agent.store import Store, audit


def bind_lease(store: Store, lease_id: str, cgroup: str) -> bool:
    """Record ``cgroup`` as the lease's; False when it is not active and unbound (any more)."""
    with store.transaction() as db:
        row = db.execute(
            "SELECT partition_uuid FROM leases WHERE id = ? AND state = 'active' AND cgroup = ''",
            (lease_id,),
        ).fetchone()
        if row is None:
            return False
        db.execute("UPDATE leases SET cgroup = ? WHERE id = ?", (cgroup, lease_id))
        audit.append(
            db, "lease.bound", lease_id=lease_id, partition_uuid=row[0],
            detail={"cgroup": cgroup, "at": time.time()},
        )  # fmt: skip
    return True
