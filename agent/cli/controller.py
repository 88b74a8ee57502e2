"""``accelguard controller init|serve|check-config`` and ``accelguard ctl ...``: parsing and output.

agent/cli.py adds these with :func:`add_parsers` and runs them with :func:`run`. Errors are
raised as AccelguardErrors (the CLI prints one line).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path
from typing import Any

from agent.cli import remote
from agent.cli.output import add_output, message_dict, print_json, print_table, rfc3339
from agent.errors import AuditTamperedError, ConfigError


def add_parsers(commands: argparse._SubParsersAction[Any]) -> None:
    controller = commands.add_parser("controller", help="the fleet controller (its own process)")
    verbs = controller.add_subparsers(dest="verb", required=True)
    init = verbs.add_parser("init", help="create the CA, server certificate and command key")
    init.add_argument("--dir", type=Path, required=True, help="controller state directory")
    init.add_argument("--trust-domain", default="accelguard.local")
    init.add_argument(
        "--name", action="append", default=[],
        help="DNS name or IP nodes dial (repeatable; default localhost, 127.0.0.1)",
    )  # fmt: skip
    init.add_argument("--enroll-listen", default="0.0.0.0:7443")
    init.add_argument("--link-listen", default="0.0.0.0:7444")
    serve = verbs.add_parser("serve", help="run the controller in the foreground")
    serve.add_argument("--config", dest="controller_config", type=Path, required=True)
    check = verbs.add_parser("check-config", help="validate controller.toml, print it")
    check.add_argument("--config", dest="controller_config", type=Path, required=True)
    broker = verbs.add_parser(
        "broker-certificate",
        help="issue the MQTT broker's TLS certificate from the controller CA (docs/edge.md)",
    )
    broker.add_argument("--config", dest="controller_config", type=Path, required=True)
    broker.add_argument(
        "--name", action="append", required=True,
        help="DNS name or IP the nodes dial the broker by (repeatable)",
    )  # fmt: skip
    broker.add_argument("--out", type=Path, required=True,
                        help="directory for broker.key, broker.pem and ca.pem")  # fmt: skip

    ctl = commands.add_parser("ctl", help="operate the fleet through the controller")
    ctl.add_argument(
        "--controller-config", type=Path, default=None,
        help="controller.toml (default /etc/accelguard/controller.toml): where its socket is",
    )  # fmt: skip
    ctl_verbs = ctl.add_subparsers(dest="verb", required=True)
    token = ctl_verbs.add_parser("token", help="bootstrap tokens")
    token_verbs = token.add_subparsers(dest="token_verb", required=True)
    create = token_verbs.add_parser("create", help="a one-time token for one node id")
    create.add_argument("--node-id", required=True)
    create.add_argument("--ttl", type=_duration, default=0.0, help="e.g. 1h, 30m, 600 (default 1h)")
    add_output(create)
    nodes = ctl_verbs.add_parser("nodes", help="enrolled nodes")
    add_output(nodes)
    node = ctl_verbs.add_parser("node", help="one node")
    node_verbs = node.add_subparsers(dest="node_verb", required=True)
    show = node_verbs.add_parser("show", help="a node's enrollment, link and partitions")
    show.add_argument("node_id")
    add_output(show)
    set_group = node_verbs.add_parser("set-group", help="the group whose policy the node meets")
    set_group.add_argument("node_id")
    set_group.add_argument("group")
    certs = ctl_verbs.add_parser("certs", help="scrub certificates a node reported")
    certs.add_argument("--node", required=True)
    add_output(certs)
    audit = ctl_verbs.add_parser("audit", help="the audit checkpoints a node sent")
    audit_verbs = audit.add_subparsers(dest="audit_verb", required=True)
    audit_verify = audit_verbs.add_parser(
        "verify", help="check a node's checkpoint history (signatures, going back, forks)"
    )
    audit_verify.add_argument("--node", required=True)
    add_output(audit_verify)
    audit_checkpoints = audit_verbs.add_parser(
        "checkpoints", help="a node's checkpoints as JSON, for `accelguard audit verify "
        "--checkpoints FILE` on the node"
    )  # fmt: skip
    audit_checkpoints.add_argument("--node", required=True)
    remote.add_parsers(ctl_verbs)


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (600, 30m, 1h, 7d)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("a duration must be positive")
    return value


def run(args: argparse.Namespace) -> int:
    if args.command == "controller":
        return _controller(args)
    return _ctl(args)


def _broker_certificate(settings: Any, names: list[str], out: Path) -> int:
    from agent.controller.pki import (  # noqa: PLC0415
        ControllerPki,
        bridge_identity,
        issue_service_certificate,
    )
    from agent.identity.files import write_private  # noqa: PLC0415

    pki = ControllerPki(settings.pki_dir, settings.trust_domain)
    for name in names:
        if not name or any(not (c.isascii() and (c.isalnum() or c in ".:-")) for c in name):
            raise ConfigError(f"--name {name[:80]!r}: not a DNS name or an IP address")
    key, chain = issue_service_certificate(pki, names[0], names, server=True)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(out / "broker.key", key)
    write_private(out / "broker.pem", chain)
    write_private(out / "ca.pem", pki.ca_pem)
    print(f"broker certificate: {out / 'broker.pem'}")
    print(f"broker key: {out / 'broker.key'}")
    print(f"ca: {out / 'ca.pem'}")
    # What the ACL's `user` line names (docs/edge/acl).
    print(f"controller identity: {bridge_identity(pki.trust_domain)}")
    return 0


def _controller(args: argparse.Namespace) -> int:
    from agent.controller import config as controller_config  # noqa: PLC0415

    if args.verb == "init":
        from agent.controller.pki import init_pki  # noqa: PLC0415

        names = args.name or ["localhost", "127.0.0.1"]
        directory = args.dir.resolve()
        settings = controller_config.parse_controller_config(
            {
                "controller": {
                    "state_dir": str(directory),
                    "trust_domain": args.trust_domain,
                    "enroll_listen": args.enroll_listen,
                    "link_listen": args.link_listen,
                    "admin_socket": str(directory / "controller.sock"),
                }
            }
        )
        fingerprint = init_pki(settings.controller.pki_dir, args.trust_domain, names)
        config_path = directory / "controller.toml"
        if not config_path.exists():
            config_path.write_text(
                "# accelguard controller; written by `accelguard controller init`.\n\n"
                + controller_config.controller_config_toml(settings)
            )
        print(f"ca_fingerprint: {fingerprint}")
        print(f"config: {config_path}")
        return 0
    config = controller_config.load_controller_config(args.controller_config)
    if args.verb == "broker-certificate":
        return _broker_certificate(config.controller, args.name, args.out)
    if args.verb == "check-config":
        print(controller_config.controller_config_toml(config), end="")
        return 0
    from agent.controller.server import serve  # noqa: PLC0415
    from agent.runtime.logs import configure_logging  # noqa: PLC0415

    configure_logging(config.logging)
    return serve(config)


def _socket(args: argparse.Namespace) -> Path:
    from agent.controller.config import load_controller_config  # noqa: PLC0415

    return load_controller_config(args.controller_config).controller.admin_socket


def _when(timestamp: float) -> str:
    if not timestamp:
        return "never"
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ctl(args: argparse.Namespace) -> int:
    from agent.controller.client import ControllerClient  # noqa: PLC0415

    with ControllerClient(_socket(args)) as client:
        if args.verb in remote.VERBS:
            return remote.run(client, args)
        if args.verb == "node" and args.node_verb == "set-group":
            client.set_node_group(args.node_id, args.group)
            print(f"node {args.node_id} is in group {args.group}")
            return 0
        if args.verb == "token":
            response = client.create_token(args.node_id, args.ttl)
            if args.json:
                print_json(message_dict(response))
            else:
                print(response.token)
            return 0
        if args.verb == "nodes":
            nodes = client.nodes()
            if args.json:
                print_json(message_dict(nodes))
                return 0
            print(f"{'NODE':24} {'LINK':15} {'LAST SEEN':21} {'ATTESTATION':12} {'TRUST':18} "
                  "PARTITIONS")  # fmt: skip
            for node in nodes.nodes:
                partitions = ", ".join(f"{p.state}={p.count}" for p in node.partitions) or "-"
                link = f"connected/{node.transport}" if node.connected else "offline"
                trust = node.trust + (",cordoned" if node.cordoned else "")
                if node.unhealthy_gpus:
                    partitions += f" ({node.unhealthy_gpus} GPU unhealthy)"
                print(
                    f"{node.node_id:24} {link:15} {_when(node.last_seen):21} "
                    f"{node.attestation:12} {trust:18} {partitions}"
                )
            return 0
        if args.verb == "node":
            detail = client.node(args.node_id)
            if args.json:
                print_json(message_dict(detail))
                return 0
            summary = detail.summary
            print(f"node: {summary.node_id} ({detail.spiffe_id})")
            link = f"connected over {summary.transport}" if summary.connected else "offline"
            if summary.broker_state:
                link += f" (MQTT state: {summary.broker_state})"
            print(f"link: {link}, last seen "
                  f"{_when(summary.last_seen)}, agent {summary.agent_version or '-'}")  # fmt: skip
            print(f"attestation: {summary.attestation}, AK name {detail.ak_name_hex or '-'}")
            print(f"trust: {summary.trust}{', CORDONED' if summary.cordoned else ''}, group "
                  f"{summary.group}, last quote {_when(detail.last_attested_at)}")  # fmt: skip
            for reason in detail.trust_reasons:
                print(f"  untrusted: {reason}")
            for refusal in detail.refusals:
                print(f"  refused {_when(refusal.at)} {refusal.reason}: {refusal.detail}")
            for event in detail.health_events:
                print(f"  gpu {event.gpu_index} {_when(event.at)} {event.kind} {event.code} -> "
                      f"{event.action}: {event.detail}")  # fmt: skip
            print(f"certificate: serial {detail.certificate_serial}, "
                  f"expires {_when(detail.certificate_not_after)}")  # fmt: skip
            print(f"reports: {summary.reports} " + json.dumps(dict(detail.reports_by_kind)))
            for p in detail.partitions:
                clean = "clean" if p.clean else "dirty"
                print(f"  {p.uuid} {p.kind} gpu{p.gpu_index} {p.profile or '-'} {p.state} {clean}"
                      + (f" lease {p.lease_id}" if p.lease_id else ""))  # fmt: skip
            return 0
        if args.verb == "audit":
            return _audit(client, args)
        if args.verb == "certs":
            certs = client.certificates(args.node)
            if args.json:
                print_json(message_dict(certs))
                return 0
            headers = ("seq", "partition", "finished", "scrub", "signature", "lease")
            rows = ((c.seq, c.partition_uuid, c.finished_at,
                     "verified" if c.scrub_verified else "NOT verified",
                     "ok" if c.signature_checked else "NOT checked", c.previous_lease_id)
                    for c in certs.certificates)  # fmt: skip
            print_table(headers, rows, empty=f"no scrub certificates from {args.node}")
            return 0
    raise ConfigError(f"unknown ctl verb {args.verb}")  # pragma: no cover


def _audit(client: Any, args: argparse.Namespace) -> int:
    """``ctl audit verify|checkpoints --node ID`` (docs/audit.md)."""
    from agent.audit.checkpoint import from_message  # noqa: PLC0415

    answer = client.audit_checkpoints(args.node)
    if args.audit_verb == "checkpoints":
        print_json(
            {
                "node": answer.node_id,
                "checkpoints": [
                    # The signed fields as signed (a verifier recomputes the signature over them).
                    {
                        **from_message(c.checkpoint).signed_dict(),
                        "received_at": rfc3339(c.received_at),
                    }
                    for c in answer.checkpoints
                ],
            }
        )
        return 0
    ok = not answer.findings
    if args.json:
        print_json(
            {
                "node": answer.node_id,
                "ok": ok,
                "checkpoints": len(answer.checkpoints),
                "last_record": max((c.checkpoint.record_index for c in answer.checkpoints),
                                   default=0),
                "findings": [{"kind": f.kind, "record": f.record, "message": f.message}
                             for f in answer.findings],
            }
        )  # fmt: skip
        return 0 if ok else 1
    if not answer.checkpoints:
        print(f"node {answer.node_id} has sent no audit checkpoint yet")
        return 0
    last = max(c.checkpoint.record_index for c in answer.checkpoints)
    if ok:
        print(
            f"node {answer.node_id}: {len(answer.checkpoints)} checkpoints signed by its "
            f"enrolled key, each after the one before; the last covers record {last}"
        )
        return 0
    for finding in answer.findings:
        print(f"{finding.kind}: {finding.message}")
    raise AuditTamperedError(
        f"node {answer.node_id}: audit checkpoints show tampering: {answer.findings[0].message}"
    )


def now() -> float:
    return time.time()
