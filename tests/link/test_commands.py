"""Remote commands end to end: the controller and two agents on simulated nodes, each with its own
booted swtpm, as real processes over mutual TLS on localhost (docs/commands.md).

A "booted" swtpm went through a real machine's firmware log and an IMA list
(tests/attest_e2e/helpers.py), and the agent's [attest] section points at those files, so the
controller's attestation on connect passes exactly when nothing was changed behind its back."""

from __future__ import annotations

import contextlib
import errno
import json
import sqlite3
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.attest.logs.eventlog import parse_event_log
from agent.attest.tpm.client import TpmClient
from agent.controller.client import ControllerClient
from agent.isolation.cgroups import hierarchy_mounts
from agent.link.envelope import COMMAND_CONTEXT, CommandKey, new_envelope, sign_command
from agent.proto.accelguard.v1 import controller_pb2 as controller_pb
from agent.proto.accelguard.v1 import link_pb2 as pb
from tests.attest_e2e.helpers import (
    boot_measurements,
    extend_event_log,
    extend_ima,
    ima_list,
    real_log,
    run_cli,
)
from tests.link.support import Controller, LinkNode, wait_for
from tests.support import all_gpu_nodes, probe, wait_all_clean

TESTDATA = Path(__file__).resolve().parents[3] / "shared/testdata/eventlogs/tpm2-tools"


def boot(node: LinkNode) -> None:
    """Measure a real firmware log and an IMA list into the node's swtpm; point [attest] there."""
    event_log, measurements = real_log(), boot_measurements()
    with TpmClient(node.swtpm.tcti) as client:
        extend_event_log(client, parse_event_log(event_log))
        extend_ima(client, measurements)
    (node.root / "eventlog.bin").write_bytes(event_log)
    (node.root / "ima.bin").write_bytes(ima_list(measurements))


def configure_booted(booted: LinkNode, parent: Path, link: dict[str, Any], **sections: Any) -> None:
    """The [link] given, [attest] at the files boot() wrote, tenants under ``parent``; other
    sections (``node={...}``) as given."""
    booted.configure(
        link,
        attest={
            "event_log": str(booted.root / "eventlog.bin"),
            "ima_log": str(booted.root / "ima.bin"),
        },
        tenants={"cgroup_parents": [str(parent)]},
        health={"poll_interval_s": 1.0},
        **sections,
    )


def start(node: LinkNode, controller: Controller, parent: Path) -> None:
    configure_booted(node, parent, {"controller": controller.link_address, "heartbeat_s": 1.0})
    node.agent.start()
    result = node.enroll(controller.token(node.node_id))
    assert result.returncode == 0, result.stderr


def trust(controller: Controller, node: LinkNode) -> dict[str, Any]:
    return controller.ctl_json("node", "show", node.node_id)  # type: ignore[no-any-return]


def wait_trust(controller: Controller, node: LinkNode, wanted: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        detail = trust(controller, node)
        return detail if detail["summary"]["trust"] == wanted else None

    return wait_for(check, f"{node.node_id} {wanted}", timeout=90, interval=0.5)  # type: ignore[no-any-return]


class Status(dict[str, Any]):
    """A CommandStatus document whose repr shows all of it (assertion messages)."""

    def __repr__(self) -> str:
        shown = dict(self)
        if isinstance(shown.get("result"), dict) and "attestation" in shown["result"]:
            shown["result"] = {**shown["result"], "attestation": "..."}
        return json.dumps(shown, indent=1)[:4000]


def run(controller: Controller, *args: str) -> tuple[int, dict[str, Any]]:
    result = controller.ctl(*args, "--json")
    document = Status(json.loads(result.stdout) if result.stdout.strip() else {})
    document["stderr"] = result.stderr
    return result.returncode, document


PARENT: list[Path] = []  # the tenants' parent cgroup of the running fleet


@contextlib.contextmanager
def tenant_cgroup() -> Iterator[Path]:
    path = PARENT[0] / f"tenant-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.rmdir()


@contextlib.contextmanager
def tenants_parent(prefix: str) -> Iterator[Path]:
    """A parent cgroup for the fleet's tenants (PARENT; skipped without a device hierarchy),
    removed with what the tests left in it."""
    mounts = hierarchy_mounts("v2") or hierarchy_mounts("v1-devices")
    if not mounts:
        pytest.skip("this machine has no cgroup v2 or v1 devices hierarchy mounted")
    parent = mounts[0] / f"{prefix}-{uuid.uuid4().hex[:8]}"
    parent.mkdir()
    PARENT[:] = [parent]
    try:
        yield parent
    finally:
        for child in parent.iterdir():
            if child.is_dir():
                with contextlib.suppress(OSError):
                    child.rmdir()
        with contextlib.suppress(OSError):
            parent.rmdir()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Controller, LinkNode, LinkNode]]:
    with tenants_parent("accelguard-remote") as parent:
        controller = Controller(tmp_path / "controller")
        controller.init(attest_interval_s=3.0, command_timeout_s=60.0)
        controller.start()
        nodes: list[LinkNode] = []
        try:
            nodes.append(LinkNode(tmp_path / "nodeA", controller, mig_enabled=True))
            nodes.append(LinkNode(tmp_path / "nodeB", controller))
            for node in nodes:
                boot(node)
                start(node, controller, parent)
            for node in nodes:
                wait_trust(controller, node, "trusted")
                wait_all_clean(node.agent)
            yield controller, nodes[0], nodes[1]
        finally:
            for node in nodes:
                node.close()
            controller.stop()


def local_partitions(node: LinkNode) -> list[dict[str, Any]]:
    return node.agent.cli_json("partition", "list")["partitions"]  # type: ignore[no-any-return]


def local_leases(node: LinkNode) -> list[dict[str, Any]]:
    return node.agent.cli_json("lease", "list").get("leases", [])  # type: ignore[no-any-return]


def test_remote_grant_fences_release_certifies_layout_touches_one_node(
    fleet: tuple[Controller, LinkNode, LinkNode],
) -> None:
    controller, node_a, node_b = fleet
    before_b = {p["uuid"]: p["profile"] for p in local_partitions(node_b)}
    with tenant_cgroup() as cgroup:
        code, status = run(
            controller, "lease", "grant", "--node", node_b.node_id, "--tenant", "alice",
            "--profile", "gpu", "--cgroup", str(cgroup), "--ttl", "3600",
        )  # fmt: skip
        assert code == 0, status
        assert status["state"] == "done"
        grant = status["result"]["grant"]
        lease_id, allowed = grant["lease"]["id"], grant["partition"]["device_nodes"]
        # The same lease exists on the node, made by the same code as a local grant.
        leases = local_leases(node_b)
        assert [lease["id"] for lease in leases] == [lease_id]
        everything = all_gpu_nodes(node_b.agent.config.devices.dev_root)
        seen = probe(cgroup, everything)
        assert {seen[path] for path in allowed} == {errno.ENXIO}
        assert {seen[path] for path in everything if path not in allowed} == {errno.EPERM}

        code, status = run(controller, "lease", "release", "--node", node_b.node_id, lease_id)
        assert code == 0, status
        certificate = json.loads(status["result"]["scrub_certificate_json"])
        assert certificate["payload"]["previous_lease_id"] == lease_id
        assert certificate["payload"]["node_id"] == node_b.node_id
        assert status["result"]["partition"]["clean"] is True
        assert set(probe(cgroup, everything).values()) == {errno.EPERM}

    code, status = run(
        controller, "layout", "apply", "--node", node_a.node_id, "--gpu", "0", "3g.40gb=2"
    )
    assert code == 0, status
    created = status["result"]["layout"]["gpus"][0]["created"]
    assert [c["profile"] for c in created] == ["3g.40gb", "3g.40gb"]
    profiles_a = [p["profile"] for p in wait_all_clean(node_a.agent) if p["gpu_index"] == 0]
    assert sorted(profiles_a) == ["3g.40gb", "3g.40gb"]
    assert {p["uuid"]: p["profile"] for p in local_partitions(node_b)} == before_b
    # The node records what the controller asked for as its desired layout...
    [wanted] = node_a.agent.cli_json("layout", "desired")["gpus"]
    assert wanted["counts"] == {"3g.40gb": 2} and wanted["recorded_by"].startswith("controller")
    # ... and refuses MIG on with no instances unless the command says clear, whatever sent it
    # (`ctl layout apply` refuses before sending; a controller need not).
    socket = tomllib.loads(controller.config_path.read_text())["controller"]["admin_socket"]
    empty = controller_pb.RunCommandRequest(node_id=node_a.node_id, timeout_s=60)
    empty.apply_layout.targets.add(gpu_indices=[0], mig_enabled=True)
    with ControllerClient(Path(socket), timeout_s=90) as client:
        refused = client.run_command(empty)
    assert refused.state == "failed" and refused.result.exit_code == 2, refused
    assert "GPU 0" in refused.result.error and "clear" in refused.result.error
    assert sorted(p["profile"] for p in local_partitions(node_a) if p["gpu_index"] == 0) == [
        "3g.40gb", "3g.40gb",
    ]  # fmt: skip
    code, status = run(
        controller, "layout", "apply", "--node", node_a.node_id, "--gpu", "0", "--clear"
    )
    assert code == 0, status
    assert len(status["result"]["layout"]["gpus"][0]["destroyed"]) == 2
    assert node_a.agent.cli_json("layout", "desired")["gpus"][0]["clear"] is True

    history = controller.ctl_json("commands", "--node", node_b.node_id)["commands"]
    kinds = [c["kind"] for c in history]
    assert "grant_lease" in kinds and "release_lease" in kinds


def _signed(key: CommandKey, node_id: str, kind: str, body: Any, **fields: Any) -> bytes:
    envelope = new_envelope(node_id, 60.0)
    for name, value in fields.items():
        setattr(envelope, name, value)
    getattr(envelope, kind).CopyFrom(body)
    return sign_command(key, envelope).SerializeToString()


def _queue(controller: Controller, node_id: str, signed: bytes, kind: str) -> bytes:
    """Put a command in the controller's queue as the controller itself would, but with bytes
    the test made: it is delivered, unchanged, when the node (re)connects."""
    message = pb.SignedCommand.FromString(signed)
    try:
        command_id = (
            pb.CommandEnvelope.FromString(message.envelope).command_id or uuid.uuid4().bytes
        )
    except Exception:  # noqa: BLE001 - garbage envelopes have no id: give the row one
        command_id = uuid.uuid4().bytes
    now = time.time()
    with contextlib.closing(sqlite3.connect(controller.database, timeout=30)) as db, db:
        db.execute(
            "INSERT INTO commands (id, node_id, kind, issued_at, not_after, signed, state) "
            "VALUES (?, ?, ?, ?, ?, ?, 'queued')",
            (command_id, node_id, kind, now, now + 300, signed),
        )
    return bytes(command_id)


def test_refusals_change_nothing_and_reach_the_controller(
    fleet: tuple[Controller, LinkNode, LinkNode],
) -> None:
    controller, node_a, node_b = fleet
    pem = (controller.root / "pki" / "command.key").read_bytes()
    key = CommandKey(serialization.load_pem_private_key(pem, password=None))  # type: ignore[arg-type]
    other = CommandKey(Ed25519PrivateKey.generate())
    grant = pb.GrantLeaseCommand(tenant="mallory", profile="gpu", cgroup="/sys/fs/cgroup/x")
    now = time.time()

    def good() -> pb.SignedCommand:
        return pb.SignedCommand.FromString(_signed(key, node_b.node_id, "grant_lease", grant))

    def altered() -> bytes:
        signed = good()
        envelope = pb.CommandEnvelope.FromString(signed.envelope)
        envelope.grant_lease.tenant = "eve"
        return pb.SignedCommand(
            envelope=envelope.SerializeToString(), signature=signed.signature
        ).SerializeToString()

    def oversized() -> bytes:
        signed = good()
        return pb.SignedCommand(
            envelope=signed.envelope + b"\x00" * (70 << 10), signature=signed.signature
        ).SerializeToString()

    def unknown_body() -> bytes:
        envelope = new_envelope(node_b.node_id, 60.0)
        envelope.key_id = key.key_id
        # Field 100 of the envelope: no member of the closed set.
        data = envelope.SerializeToString() + b"\xa2\x06\x05shell"
        return pb.SignedCommand(
            envelope=data, signature=key.private.sign(COMMAND_CONTEXT + data)
        ).SerializeToString()

    cases = {
        "unknown body": unknown_body(),
        "unsigned": pb.SignedCommand(envelope=good().envelope).SerializeToString(),
        "another key": _signed(other, node_b.node_id, "grant_lease", grant),
        "another node": _signed(key, node_a.node_id, "grant_lease", grant),
        "expired": _signed(
            key, node_b.node_id, "grant_lease", grant, issued_at=now - 700, not_after=now - 100
        ),
        "future": _signed(
            key, node_b.node_id, "grant_lease", grant, issued_at=now + 3600, not_after=now + 3700
        ),
        "altered": altered(),
        "garbage": pb.SignedCommand(
            envelope=b"\x0a\xff\x01zz", signature=b"\x00" * 64
        ).SerializeToString(),
        "oversized": oversized(),
    }
    expected = {
        "unknown body": "unknown_body",
        "unsigned": "signature", "another key": "unknown_key", "another node": "wrong_node",
        "expired": "expired", "future": "future", "altered": "signature",
        "garbage": "malformed", "oversized": "oversized",
    }  # fmt: skip
    node_b.agent.stop()
    ids = {
        name: _queue(controller, node_b.node_id, data, "grant_lease")
        for name, data in cases.items()
    }
    node_b.agent.start()

    def refusals() -> list[dict[str, Any]] | None:
        found = trust(controller, node_b).get("refusals", [])
        return found if len({r["reason"] for r in found}) >= len(set(expected.values())) else None

    found = wait_for(refusals, "the node's refusals at the controller", timeout=60)
    assert {r["reason"] for r in found} >= set(expected.values())
    assert local_leases(node_b) == [], "a refused command granted a lease"
    by_id = {
        c["command_id"]: c
        for c in controller.ctl_json("commands", "--node", node_b.node_id)["commands"]
    }
    for name, command_id in ids.items():
        if name in ("garbage", "oversized"):
            continue  # no authentic id to match: the refusal is in the node's log above
        row = by_id[command_id.hex()]
        assert row["state"] == "refused", (name, row)
        assert row["result"]["refusal"] == expected[name], (name, row)
    show = controller.ctl("node", "show", node_b.node_id)
    assert "refused" in show.stdout and "wrong_node" in show.stdout

    # Replayed, after an agent restart too: the stored result, and it acts once.
    with tenant_cgroup() as cgroup:
        code, status = run(
            controller, "lease", "grant", "--node", node_b.node_id, "--tenant", "alice",
            "--profile", "gpu", "--cgroup", str(cgroup),
        )  # fmt: skip
        assert code == 0, status
        command_id = bytes.fromhex(status["command_id"])
        node_b.agent.stop()
        with contextlib.closing(sqlite3.connect(controller.database, timeout=30)) as db, db:
            db.execute(
                "UPDATE commands SET state = 'queued', result = NULL WHERE id = ?", (command_id,)
            )
        node_b.agent.start()

        def redelivered() -> dict[str, Any] | None:
            rows = controller.ctl_json("commands", "--node", node_b.node_id)["commands"]
            row = next(r for r in rows if r["command_id"] == command_id.hex())
            return row if row["state"] != "queued" else None

        row = wait_for(redelivered, "the re-delivered grant's answer")
        assert row["state"] == "done"
        assert row["result"]["duplicate"] is True and row["result"]["refusal"] == "replayed"
        assert row["result"]["grant"]["lease"]["id"] == status["result"]["grant"]["lease"]["id"]
        live = local_leases(node_b)
        assert len(live) == 1, "the replayed grant ran twice"
        code, _ = run(controller, "lease", "release", "--node", node_b.node_id, live[0]["id"])
        assert code == 0


def test_offline_nodes_get_queued_commands_until_they_expire(
    fleet: tuple[Controller, LinkNode, LinkNode],
) -> None:
    controller, _, node_b = fleet
    uuid_b = local_partitions(node_b)[0]["uuid"]
    node_b.agent.stop()
    wait_for(lambda: not trust(controller, node_b)["summary"]["connected"], "B offline")
    with tenant_cgroup() as cgroup:
        result = controller.ctl(
            "lease", "grant", "--node", node_b.node_id, "--tenant", "alice", "--profile", "gpu",
            "--cgroup", str(cgroup), "--timeout", "1",
        )  # fmt: skip
        assert result.returncode == 75, result.stderr
        assert "offline" in result.stdout and "stays queued" in result.stdout
        result = controller.ctl(
            "partition", "quarantine", "--node", node_b.node_id, uuid_b, "--reason", "late",
            "--command-ttl", "2", "--timeout", "1",
        )  # fmt: skip
        assert result.returncode == 75

        def expired() -> bool:
            rows = controller.ctl_json("commands", "--node", node_b.node_id)["commands"]
            return any(
                r["kind"] == "quarantine_partition" and r["state"] == "expired" for r in rows
            )

        wait_for(expired, "the quarantine command to expire", timeout=30)
        listing = controller.ctl("commands", "--node", node_b.node_id)
        assert "expired" in listing.stdout
        node_b.agent.start()

        def granted() -> list[dict[str, Any]] | None:
            return local_leases(node_b) or None

        leases = wait_for(granted, "the queued grant to run after reconnecting")
        assert leases[0]["tenant"] == "alice"
        assert next(p for p in local_partitions(node_b) if p["uuid"] == uuid_b)["state"] != (
            "quarantined"
        ), "an expired command ran"
        code, _ = run(controller, "lease", "release", "--node", node_b.node_id, leases[0]["id"])
        assert code == 0


def test_attestation_failures_cordon_until_a_passing_quote_and_uncordon(
    fleet: tuple[Controller, LinkNode, LinkNode], tmp_path: Path
) -> None:
    controller, node_a, node_b = fleet
    # A: PCR 14 extended behind the controller's back (swtpm, as a rogue boot component would).
    with TpmClient(node_a.swtpm.tcti) as client:
        client.extend_pcr(14, {"sha256": b"\x66" * 32, "sha1": b"\x66" * 20})
    detail = wait_trust(controller, node_a, "untrusted")  # the loop, within one interval
    assert detail["summary"]["cordoned"] is True
    assert any("14" in reason or "event_log" in reason for reason in detail["trust_reasons"])
    with tenant_cgroup() as cgroup:
        result = controller.ctl(
            "lease", "grant", "--node", node_a.node_id, "--tenant", "t", "--profile", "gpu",
            "--cgroup", str(cgroup),
        )  # fmt: skip
        assert result.returncode == 2 and "cordoned" in result.stderr
    # The node itself was cordoned too: it would refuse a remote grant on its own.
    wait_for(lambda: node_a.outbox("SELECT value FROM meta WHERE key = 'commands_cordoned'")
             == [("1",)], "A cordoned in its own journal")  # fmt: skip
    assert controller.ctl("uncordon", "--node", node_a.node_id).returncode == 2

    # B: a policy it does not meet (another machine's log), then one made from its own log.
    wrong = tmp_path / "wrong-policy.json"
    good = tmp_path / "good-policy.json"
    # Policies as make-policy writes them by default (every bank the log replays): the
    # controller quotes whatever banks and PCRs the group's policy judges.
    assert run_cli("attest", "make-policy", str(TESTDATA / "event-arch-linux.bin"),
                   "-o", str(wrong)).returncode == 0  # fmt: skip
    assert run_cli("attest", "make-policy", str(node_b.root / "eventlog.bin"),
                   "-o", str(good)).returncode == 0  # fmt: skip
    assert controller.ctl("node", "set-group", node_b.node_id, "gpu-fleet").returncode == 0
    assert controller.ctl("policy", "set", "--group", "gpu-fleet", str(wrong)).returncode == 0
    code, status = run(controller, "attest", "--node", node_b.node_id)
    assert code == 1 and status["verdict"]["passed"] is False
    assert trust(controller, node_b)["summary"]["trust"] == "untrusted"
    assert controller.ctl("policy", "set", "--group", "gpu-fleet", str(good)).returncode == 0
    code, status = run(controller, "attest", "--node", node_b.node_id)
    assert code == 0 and status["verdict"]["passed"] is True, status
    assert trust(controller, node_b)["summary"]["cordoned"] is True, "a pass alone uncordoned it"
    code, status = run(controller, "uncordon", "--node", node_b.node_id)
    assert code == 0, status
    assert trust(controller, node_b)["summary"]["cordoned"] is False
    with tenant_cgroup() as cgroup:
        code, status = run(
            controller, "lease", "grant", "--node", node_b.node_id, "--tenant", "t",
            "--profile", "gpu", "--cgroup", str(cgroup),
        )  # fmt: skip
        assert code == 0, status
        code, _ = run(controller, "lease", "release", "--node", node_b.node_id,
                      status["result"]["grant"]["lease"]["id"])  # fmt: skip
        assert code == 0


def test_command_key_rotation_is_announced_under_the_old_key(
    fleet: tuple[Controller, LinkNode, LinkNode],
) -> None:
    controller, node_a, node_b = fleet
    old_pem = (controller.root / "pki" / "command.key").read_bytes()
    old = CommandKey(serialization.load_pem_private_key(old_pem, password=None))  # type: ignore[arg-type]
    assert trust(controller, node_b)["command_key_id"] == old.key_id
    node_b.agent.stop()  # B is offline: it gets the announcement when it reconnects
    code, rotated = run(controller, "command-key", "rotate")
    assert code == 0 and rotated["created"] is True, rotated
    new_id = rotated["key_id"]
    assert rotated["previous_key_id"] == old.key_id and new_id != old.key_id
    assert sorted(rotated["announced"]) == sorted([node_a.node_id, node_b.node_id])
    wait_for(lambda: trust(controller, node_a)["command_key_id"] == new_id, "A's confirmation")
    # While B has not confirmed, another rotation only re-announces the current key to it.
    code, again = run(controller, "command-key", "rotate")
    assert code == 0 and again["created"] is False and again["announced"] == [node_b.node_id]
    node_b.agent.start()
    wait_for(lambda: trust(controller, node_b)["command_key_id"] == new_id, "B's confirmation")
    pinned = (node_b.root / "link" / "command-key.pem").read_text()
    assert pinned == (controller.root / "pki" / "command.pub").read_text()
    # Commands now go out under the new key; one made with the old key is refused.
    code, status = run(controller, "cordon", "--node", node_b.node_id, "--reason", "drill")
    assert code == 0, status
    assert run(controller, "uncordon", "--node", node_b.node_id)[0] == 0
    node_b.agent.stop()
    stale = _signed(old, node_b.node_id, "cordon", pb.CordonCommand(reason="stale key"))
    command_id = _queue(controller, node_b.node_id, stale, "cordon")
    node_b.agent.start()

    def refused() -> dict[str, Any] | None:
        rows = controller.ctl_json("commands", "--node", node_b.node_id)["commands"]
        row = next(r for r in rows if r["command_id"] == command_id.hex())
        return row if row["state"] == "refused" else None

    row = wait_for(refused, "the old key's command refused")
    assert row["result"]["refusal"] == "unknown_key"
    assert not trust(controller, node_b)["summary"]["cordoned"]


def test_gpu_health_faults_reach_the_controller(
    fleet: tuple[Controller, LinkNode, LinkNode],
) -> None:
    controller, _, node_b = fleet
    result = node_b.agent.cli("sim", "inject", "xid", "--gpu", "1", "--xid", "79")
    assert result.returncode == 0, result.stderr

    def unhealthy() -> dict[str, Any] | None:
        nodes = {n["node_id"]: n for n in controller.ctl_json("nodes")["nodes"]}
        return nodes[node_b.node_id] if nodes[node_b.node_id]["unhealthy_gpus"] == 1 else None

    wait_for(unhealthy, "the controller to see B's failed GPU")
    detail = trust(controller, node_b)
    assert int(detail["reports_by_kind"].get("health_event", 0)) >= 1  # uint64: a JSON string
    gpu1 = [p for p in detail["partitions"] if p["gpu_index"] == 1]
    assert gpu1 and all(p["state"] == "quarantined" for p in gpu1)
    assert "GPU unhealthy" in controller.ctl("nodes").stdout

    # The heartbeats carry each GPU's readings (droppable samples, beside the never-dropped
    # health event), as the controller stored them.
    def samples() -> list[Any] | None:
        rows = controller.query(
            "SELECT body FROM reports WHERE node_id = ? AND kind = 'health'", node_b.node_id
        )
        found = [pb.Report.FromString(body).health for (body,) in rows]
        return [s for s in found if len(s.gpus) == 2] or None

    sample = wait_for(samples, "a heartbeat with both GPUs' readings")[-1]
    assert all(g.temperature_c > 0 and g.uuid.startswith("GPU-") for g in sample.gpus)

    # An application XID on GPU 0 and a DBE on GPU 0 reach the controller as events too, each
    # with what the node did.
    for args in (("xid", "--gpu", "0", "--xid", "13"), ("ecc", "--gpu", "0", "--dbe", "1")):
        assert node_b.agent.cli("sim", "inject", *args).returncode == 0

    def events() -> list[Any] | None:
        rows = controller.query(
            "SELECT body FROM reports WHERE node_id = ? AND kind = 'health_event' ORDER BY seq",
            node_b.node_id,
        )
        found = [pb.Report.FromString(body).health_event for (body,) in rows]
        return found if len(found) >= 3 else None

    seen = {(e.gpu_index, e.kind, e.code, e.action) for e in wait_for(events, "three events")}
    assert seen >= {(1, "xid", 79, "quarantine_gpu"), (0, "xid", 13, "lease_event"),
                    (0, "ecc_dbe", 1, "quarantine_gpu")}  # fmt: skip
    # The operator sees them at the controller: `ctl node show`.
    shown = trust(controller, node_b)["health_events"]
    assert {(e["gpu_index"], e["kind"], e["action"]) for e in shown} >= {
        (1, "xid", "quarantine_gpu"),
        (0, "xid", "lease_event"),
        (0, "ecc_dbe", "quarantine_gpu"),
    }
    text = controller.ctl("node", "show", node_b.node_id).stdout
    assert "ecc_dbe 1 -> quarantine_gpu" in text
