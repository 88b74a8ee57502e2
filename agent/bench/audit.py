"""``accelguard bench audit``: what the audit log costs an admin call (docs/audit.md).

Two agents on two simulated nodes, the same in all but ``[audit] enabled``, take the same
audited admin calls in alternation: a grant (the admin record, the lease's transition records,
the fence's record) and a release to clean (transitions, eviction, scrub result). The JSON has
both agents' latencies and the p50 the audit log adds; the aim is under 1 ms for the grant.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Final

from agent.bench.common import bench_scratch, latency, start_agent, wait_all_clean, wait_for_agent
from agent.config import config_as_dict, load_config, parse_config, to_toml
from agent.errors import ValidationError
from agent.runtime.process import stop_process
from agent.sim.node import init_sim_node

AIM_ADDED_P50_MS: Final = 1.0


def bench_audit(rounds: int, directory: Path | None) -> dict[str, Any]:
    from agent.admin.client import AdminClient  # noqa: PLC0415
    from agent.isolation.cgroups import hierarchy_mounts  # noqa: PLC0415
    from agent.proto.accelguard.v1 import admin_pb2 as pb  # noqa: PLC0415

    mounts = hierarchy_mounts("v2") or hierarchy_mounts("v1-devices")
    if not mounts:
        raise ValidationError("bench audit needs a cgroup v2 or v1 devices hierarchy")
    samples: dict[str, dict[str, list[float]]] = {}
    with contextlib.ExitStack() as stack:
        root = bench_scratch(stack, directory, "accelguard-bench-audit-")
        parent = mounts[0] / f"accelguard-bench-audit-{os.getpid()}"
        parent.mkdir()
        stack.callback(parent.rmdir)
        clients: dict[str, tuple[Any, Any]] = {}
        for name, enabled in (("audited", True), ("not_audited", False)):
            tenant = parent / name
            tenant.mkdir()
            stack.callback(tenant.rmdir)
            node = init_sim_node(root / name, "h100x1", cgroup_parents=[parent],
                                 slice_bytes=1 << 20)  # fmt: skip
            document = config_as_dict(load_config(node.config_path))
            document["audit"]["enabled"] = enabled
            node.config_path.write_text(to_toml(parse_config(document)))
            config = load_config(node.config_path)
            agent = start_agent(node.config_path)
            stack.callback(stop_process, agent)
            client = stack.enter_context(AdminClient(config.admin.socket, timeout_s=60))
            wait_for_agent(client, agent)
            client.apply_layout(
                pb.LayoutRequest(targets=[
                    pb.LayoutTarget(gpu_indices=[0], mig_enabled=True, counts={"1g.10gb": 1})
                ])
            )  # fmt: skip
            wait_all_clean(client)
            request = pb.GrantLeaseRequest(tenant="bench", profile="1g.10gb", cgroup=str(tenant))
            clients[name] = (client, request)
            samples[name] = {"grant": [], "release": []}
        for _ in range(rounds):
            for name, (client, request) in clients.items():
                start = time.perf_counter()
                lease = client.grant_lease(request).lease.id
                samples[name]["grant"].append(time.perf_counter() - start)
                start = time.perf_counter()
                released = client.release_lease(lease)
                samples[name]["release"].append(time.perf_counter() - start)
                if not released.clean:
                    raise ValidationError(f"release did not end clean: {released.reason}")
        records = _records(root / "audited")
    on = {call: latency(values) for call, values in samples["audited"].items()}
    off = {call: latency(values) for call, values in samples["not_audited"].items()}
    added = {call: on[call]["p50_ms"] - off[call]["p50_ms"] for call in on}
    return {
        "benchmark": "audit",
        "rounds": rounds,
        "audited": on,
        "baseline_not_audited": off,
        "added_p50_ms": added,
        "ratio_grant_p50": on["grant"]["p50_ms"] / off["grant"]["p50_ms"],
        "records_written": records,
        "records_per_round": records / rounds,
        "aim": f"an audited grant adds < {AIM_ADDED_P50_MS} ms at p50",
        "aims_met": {"grant_added_p50": added["grant"] < AIM_ADDED_P50_MS},
    }


def _records(node_root: Path) -> int:
    import sqlite3  # noqa: PLC0415

    from agent.store import audit  # noqa: PLC0415

    config = load_config(node_root / "agent.toml")
    with contextlib.closing(sqlite3.connect(config.node.store_path, timeout=30)) as db:
        return audit.count(db)
