"""A lease granted and released locally reaches the controller: every lease event in order, and
the scrub certificate that ends it, its signature checked against the key the node enrolled."""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.isolation.cgroups import hierarchy_mounts
from agent.proto.accelguard.v1 import link_pb2 as pb
from tests.link.support import Controller, LinkNode, wait_for
from tests.support import wait_all_clean


@pytest.fixture
def tenant_parent() -> Iterator[Path]:
    mounts = hierarchy_mounts("v2") or hierarchy_mounts("v1-devices")
    if not mounts:
        pytest.skip("this machine has no cgroup v2 or v1 devices hierarchy mounted")
    parent = mounts[0] / f"accelguard-link-{uuid.uuid4().hex[:8]}"
    parent.mkdir()
    try:
        yield parent
    finally:
        for directory in sorted((p for p in parent.rglob("*") if p.is_dir()), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            parent.rmdir()


def _lease_states(controller: Controller, node_id: str, lease_id: str) -> list[str]:
    with contextlib.closing(sqlite3.connect(controller.database, timeout=30)) as db:
        rows = db.execute(
            "SELECT body FROM reports WHERE node_id = ? AND kind = 'lease' ORDER BY epoch, seq",
            (node_id,),
        ).fetchall()
    states = []
    for (body,) in rows:
        report = pb.Report.FromString(body)
        if report.lease.lease_id == lease_id:
            states.append(report.lease.state)
    return states


def test_local_lease_reaches_the_controller_with_its_certificate(
    controller: Controller, one_node: LinkNode, tenant_parent: Path
) -> None:
    node = one_node
    node.configure(
        {"controller": controller.link_address, "heartbeat_s": 1.0},
        tenants={"cgroup_parents": [str(tenant_parent)]},
    )
    node.agent.start()
    enrolled = node.enroll(controller.token(node.node_id))
    assert enrolled.returncode == 0, enrolled.stderr
    wait_all_clean(node.agent)
    cgroup = tenant_parent / "tenant"
    cgroup.mkdir()
    grant = node.agent.cli_json(
        "lease", "grant", "--tenant", "t", "--profile", "gpu", "--cgroup", str(cgroup)
    )
    lease_id = grant["lease"]["id"]
    released = node.agent.cli_json("lease", "release", lease_id)
    assert released["state"] == "free" and released["clean"] is True

    def certificate() -> dict[str, object] | None:
        stored = controller.ctl_json("certs", "--node", node.node_id)["certificates"]
        return next((c for c in stored if c["previous_lease_id"] == lease_id), None)

    found = wait_for(certificate, "the release's scrub certificate at the controller")
    assert found["signature_checked"] is True
    states = wait_for(
        lambda: (s := _lease_states(controller, node.node_id, lease_id))[-1:] == ["released"] and s,
        "the lease's events at the controller",
    )
    assert states == ["granting", "active", "releasing", "released"], states
