"""A controller and two simulated nodes, each with its own swtpm, over real TLS on localhost."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from tests.link.support import Controller, LinkNode, link_nodes, wait_for
from tests.support import wait_all_clean


def _enroll_and_connect(node: LinkNode, controller: Controller) -> None:
    node.configure({"controller": controller.link_address, "heartbeat_s": 1.0})
    node.agent.start()
    result = node.enroll(controller.token(node.node_id))
    assert result.returncode == 0, result.stderr
    assert f"enrolled {node.node_id} as spiffe://test.fleet/node/{node.node_id}" in result.stdout


def test_two_nodes_enroll_with_their_tpms_and_report(
    controller: Controller, two_nodes: list[LinkNode]
) -> None:
    for node in two_nodes:
        _enroll_and_connect(node, controller)
        cert_dir = node.root / "link"
        for name in ("node.key", "node.pem", "ca.pem", "command-key.pem", "enrollment.json"):
            assert stat.S_IMODE((cert_dir / name).stat().st_mode) == 0o600, name

    def both_connected() -> list[dict[str, object]] | None:
        nodes = controller.ctl_json("nodes")["nodes"]
        ready = [n for n in nodes if n["connected"] and n["partitions"]]
        return nodes if len(ready) == 2 else None

    nodes = wait_for(both_connected, "both nodes connected with their partitions")
    assert {n["node_id"] for n in nodes} == {n.node_id for n in two_nodes}
    assert {n["attestation"] for n in nodes} == {"attested"}
    table = controller.ctl("nodes")
    assert table.returncode == 0
    for node in two_nodes:
        assert node.node_id in table.stdout
    assert "connected" in table.stdout

    # Node B's start-up scrubs signed certificates; they reach the controller, checked against
    # the scrub key B enrolled.
    node_b = two_nodes[1]
    wait_all_clean(node_b.agent)
    local = node_b.agent.cli_json("scrub", "certs")["certificates"]
    wait_for(
        lambda: len(controller.ctl_json("certs", "--node", node_b.node_id)["certificates"])
        >= len(local),
        "node B's certificates at the controller",
    )
    stored = controller.ctl_json("certs", "--node", node_b.node_id)["certificates"]
    assert all(c["signature_checked"] for c in stored)
    payloads = {json.dumps(json.loads(c["payload_json"]), sort_keys=True) for c in stored}
    for document in local:
        assert json.dumps(document["payload"], sort_keys=True) in payloads

    detail = controller.ctl_json("node", "show", node_b.node_id)
    assert detail["spiffe_id"] == f"spiffe://test.fleet/node/{node_b.node_id}"
    assert detail["ak_name_hex"]
    assert detail["partitions"]
    assert {p["state"] for p in detail["partitions"]} <= {"free", "scrubbing", "leased"}


def test_certificate_is_renewed_over_the_link(tmp_path: Path) -> None:
    controller = Controller(tmp_path / "controller")
    controller.init(node_cert_lifetime_s=12.0)
    controller.start()
    try:
        with link_nodes(tmp_path, controller, 1) as (node,):
            _enroll_and_connect(node, controller)
            first = node.root.joinpath("link", "node.pem").read_bytes()
            serial = controller.ctl_json("node", "show", node.node_id)["certificate_serial"]
            # Two thirds of 12 s (plus the 0.6 s it is backdated): renewed within ~8 s.
            wait_for(
                lambda: node.root.joinpath("link", "node.pem").read_bytes() != first,
                "a renewed certificate", timeout=60, interval=0.5,
            )  # fmt: skip
            detail = controller.ctl_json("node", "show", node.node_id)
            assert detail["certificate_serial"] != serial
            assert "link_certificate_renewed" in node.agent.log()
    finally:
        controller.stop()


def test_node_without_tpm_enrolls_only_where_allowed(tmp_path: Path) -> None:
    for allowed in (False, True):
        controller = Controller(tmp_path / f"controller-{allowed}")
        controller.init(allow_unattested=allowed)
        controller.start()
        try:
            with link_nodes(tmp_path / str(allowed), controller, 1) as (node,):
                node.configure({"controller": controller.link_address, "heartbeat_s": 1.0})
                node.agent.start()
                result = node.enroll(controller.token(node.node_id), "--no-tpm")
                if not allowed:
                    assert result.returncode == 2
                    assert "enrolls only nodes with a TPM" in result.stderr
                    assert controller.ctl_json("nodes")["nodes"] == []
                    continue
                assert result.returncode == 0, result.stderr
                assert "unattested" in result.stdout
                nodes = wait_for(
                    lambda running=controller: [
                        n for n in running.ctl_json("nodes")["nodes"] if n["connected"]
                    ],
                    "the unattested node connected",
                )
                assert nodes[0]["attestation"] == "unattested"
        finally:
            controller.stop()
