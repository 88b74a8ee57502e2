"""Edge nodes on MQTT (docs/edge.md): failover and failback through a real mosquitto, counted:
every report a node produced is stored at the controller exactly once, and no command acts
twice, whatever broke in between."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
from typing import Any

from tests.edge.conftest import EdgeFleet
from tests.link.support import CONTROLLER, LinkNode, wait_for
from tests.link.test_commands import local_leases, run, tenant_cgroup
from tests.support import REPO, all_gpu_nodes, probe


def _stored(fleet: EdgeFleet, node: LinkNode) -> int:
    return len(fleet.controller.report_seqs(node.node_id))


def _consistent(fleet: EdgeFleet, node: LinkNode) -> int:
    """What the controller holds of ``node`` is seqs 1..n, each once (nothing lost in between,
    nothing twice), read in one query while reports keep coming; n."""
    ((count, distinct, low, high),) = fleet.controller.query(
        "SELECT COUNT(*), COUNT(DISTINCT seq), MIN(seq), MAX(seq) FROM reports WHERE node_id = ?",
        node.node_id,
    )
    assert count == distinct, f"{node.node_id}: {count - distinct} reports stored twice"
    assert count == 0 or (low == 1 and high == count), f"{node.node_id}: gap in 1..{high}"
    return int(count)


def _flowing(fleet: EdgeFleet, more: int = 10) -> None:
    """Every node's reports reach the controller again (``more`` past what it held when this
    was called), and what it holds is consistent. The nodes are waited for together."""
    held = {node.node_id: _consistent(fleet, node) for node in fleet.nodes}
    for node in fleet.nodes:
        wait_for(lambda node=node: _stored(fleet, node) > held[node.node_id] + more,
                 f"{node.node_id}'s reports flowing", timeout=90)  # fmt: skip
        _consistent(fleet, node)


def _producing(fleet: EdgeFleet, more: int) -> None:
    """Every node has written ``more`` reports to its outbox since this was called."""
    produced = {node.node_id: node.last_seq() for node in fleet.nodes}
    wait_for(lambda: all(n.last_seq() > produced[n.node_id] + more for n in fleet.nodes),
             f"{more} more reports produced on every node")  # fmt: skip


def _settle_and_count(fleet: EdgeFleet) -> None:
    """Stop producing (each agent restarted with a slow heartbeat, on whatever transport it
    finds), let every outbox drain, then: produced on the node == stored at the controller."""
    for node in fleet.nodes:
        assert node.agent.stop() == 0
        node.configure({"heartbeat_s": 3600.0})
        node.agent.start()
    for node in fleet.nodes:

        def drained(node: LinkNode = node) -> bool:
            return node.unacked() == 0 and _stored(fleet, node) == node.last_seq()

        wait_for(drained, f"{node.node_id}'s outbox drained", timeout=90)
        assert node.meta("link_dropped") == 0
        assert _consistent(fleet, node) == node.last_seq()


def _grant(fleet: EdgeFleet, node: LinkNode, cgroup: object, timeout: str = "60") -> dict[str, Any]:
    code, status = run(
        fleet.controller, "lease", "grant", "--node", node.node_id, "--tenant", "bob",
        "--profile", "gpu", "--cgroup", str(cgroup), "--ttl", "3600", "--timeout", timeout,
    )  # fmt: skip
    return {"code": code, **status}


def _applied_once(node: LinkNode, command_id: str) -> None:
    rows = node.outbox("SELECT state FROM commands WHERE id = ?", bytes.fromhex(command_id))
    assert rows == [("done",)], rows


def test_failover_and_failback_under_load_nothing_lost_nothing_twice(edge: EdgeFleet) -> None:
    edge.wait_transport("grpc")
    _flowing(edge)
    # gRPC blocked: a grant issued now waits queued, then goes over MQTT once the nodes fell back.
    edge.block_grpc()
    node = edge.nodes[0]
    with tenant_cgroup() as cgroup:
        granted = _grant(edge, node, cgroup)
        assert granted["code"] == 0 and granted["state"] == "done", granted
        edge.wait_transport("mqtt")
        # Delivered over MQTT and enforced: the lease's device nodes open, nothing else.
        allowed = granted["result"]["grant"]["partition"]["device_nodes"]
        seen = probe(cgroup, all_gpu_nodes(node.agent.config.devices.dev_root))
        assert {seen[path] for path in allowed} == {errno.ENXIO}
        assert {v for p, v in seen.items() if p not in allowed} == {errno.EPERM}
        link = node.agent.cli_json("status")["link"]
        assert link["connected"] and link["transport"] == "mqtt" and link["failovers"] == 1, link
        _flowing(edge)
        # Back on gRPC, then blocked again: failback and a second failover.
        edge.unblock_grpc()
        edge.wait_transport("grpc")
        _flowing(edge)
        edge.block_grpc()
        edge.wait_transport("mqtt")
        _flowing(edge)
        # The controller killed while the nodes are on MQTT: the broker keeps what they send.
        edge.controller.stop(signal.SIGKILL)
        _producing(edge, 5)
        edge.controller.start()
        edge.wait_transport("mqtt")
        _flowing(edge)
        # Both transports cut: the nodes keep working offline (a release is scrubbed and
        # journaled locally), then drain in order.
        edge.crash_broker()
        offline_from = {n.node_id: n.last_seq() for n in edge.nodes}
        lease_id = granted["result"]["grant"]["lease"]["id"]
        released = node.agent.cli_json("lease", "release", lease_id)
        assert released["state"] == "free" and released["clean"] is True, released
        assert not node.agent.cli_json("status")["link"]["connected"]
        wait_for(lambda: all(n.last_seq() > offline_from[n.node_id] + 20 for n in edge.nodes),
                 "reports produced with both transports down")  # fmt: skip
        edge.broker.start()
        edge.wait_transport("mqtt")
        _flowing(edge)
        edge.unblock_grpc()
        edge.wait_transport("grpc")
        _flowing(edge)
        # The grant acted once, whatever was resent over either transport, and the release
        # made offline reached the controller.
        every = node.agent.cli_json("lease", "list", "--all")["leases"]
        leases = [lease for lease in every if lease["tenant"] == "bob"]
        assert [lease["id"] for lease in leases] == [lease_id], leases
        _applied_once(node, granted["command_id"])
        wait_for(lambda: _lease_states(edge, node, lease_id) >= {"active", "released"},
                 "the offline release at the controller")  # fmt: skip
    _settle_and_count(edge)


def _lease_states(fleet: EdgeFleet, node: LinkNode, lease_id: str) -> set[str]:
    from agent.proto.accelguard.v1 import link_pb2 as pb  # noqa: PLC0415

    states = set()
    for (body,) in fleet.controller.query(
        "SELECT body FROM reports WHERE node_id = ? AND kind = 'lease'", node.node_id
    ):
        report = pb.Report.FromString(body)
        if report.lease.lease_id == lease_id:
            states.add(report.lease.state)
    return states


def _commands(fleet: EdgeFleet, node: LinkNode) -> list[str]:
    """The states of the commands the controller issued to ``node``, oldest first."""
    rows = fleet.controller.query(
        "SELECT state FROM commands WHERE node_id = ? ORDER BY issued_at", node.node_id
    )
    return [state for (state,) in rows]


def _grant_queued(
    fleet: EdgeFleet, node: LinkNode, tenant: str, cgroup: object
) -> subprocess.Popen[str]:
    """``ctl lease grant`` for ``node`` as a process (it waits for the node's answer), once the
    controller has stored the command and holds it queued: the node cannot be reached."""
    before = len(_commands(fleet, node))
    grant = subprocess.Popen(
        [*CONTROLLER, "ctl", "--controller-config", str(fleet.controller.config_path),
         "lease", "grant", "--node", node.node_id, "--tenant", tenant, "--profile",
         "gpu", "--cgroup", str(cgroup), "--timeout", "90", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    wait_for(lambda: len(_commands(fleet, node)) > before or grant.poll() is not None,
             "the grant issued")  # fmt: skip
    issued = _commands(fleet, node)[before:]
    assert issued == ["queued"], f"{issued}, the grant's exit code: {grant.poll()}"
    return grant


def test_broker_killed_and_restarted_with_and_without_persistence(edge: EdgeFleet) -> None:
    """The sessions come back, a grant issued while the broker was down is delivered once, and
    nothing is lost or stored twice: with persistence, then with the broker in memory only."""
    edge.block_grpc()
    edge.wait_transport("mqtt")
    _flowing(edge)
    node = edge.nodes[1]
    for persistence in (True, False):
        edge.crash_broker()
        edge.broker.configure(persistence=persistence)
        tenant = f"carol-{persistence}".lower()
        with tenant_cgroup() as cgroup:
            grant = _grant_queued(edge, node, tenant, cgroup)
            edge.broker.start()
            out, err = grant.communicate(timeout=120)
            assert grant.returncode == 0, (out, err)
            assert json.loads(out)["state"] == "done"
            edge.wait_transport("mqtt")
            _flowing(edge)
            leases = [lease for lease in local_leases(node) if lease["tenant"] == tenant]
            assert len(leases) == 1, leases
            code, status = run(edge.controller, "lease", "release", "--node", node.node_id,
                               leases[0]["id"])  # fmt: skip
            assert code == 0, status
    _settle_and_count(edge)


def test_a_controller_that_stops_acking_is_left_and_found_again(edge: EdgeFleet) -> None:
    """On MQTT the broker answers for the controller, so nothing says when it stops acking: one
    frozen here (SIGSTOP), as one restarted whose "say Hello again" was lost would be. Each node
    ends its session once sent reports have waited longer than hello_reply_timeout_s plus
    keepalive (4 s here) and dials again until the controller answers: nothing lost or twice."""
    edge.block_grpc()
    edge.wait_transport("mqtt")
    _flowing(edge)
    process = edge.controller.process
    assert process is not None
    process.send_signal(signal.SIGSTOP)
    try:
        for node in edge.nodes:
            wait_for(lambda node=node: "no ack for" in node.agent.log(),
                     f"{node.node_id} leaving the session nobody acks", timeout=30)  # fmt: skip
    finally:
        process.send_signal(signal.SIGCONT)
    edge.wait_transport("mqtt")
    _flowing(edge)
    _settle_and_count(edge)
