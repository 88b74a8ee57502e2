"""``accelguard ctl lease|layout|partition|cordon|uncordon|attest|rotate-certificate|...``:
remote commands through the controller (docs/commands.md), and their history and policies.

Each verb asks the controller to sign one command for one node and waits for its result
(``--timeout``). Exit codes follow the local verbs (README "Exit codes"): the node's own outcome
when it ran, 2 when it was refused (by the controller or the node), 1 when it expired without a
result, 75 when no result came within the timeout (the command stays queued until its
``not_after``: a node that is offline gets it when it reconnects).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from agent.cli.layout import add_layout_arguments, layout_request
from agent.cli.output import add_output, message_dict, print_json, print_table, table_time
from agent.errors import ExitCode, ValidationError

VERBS = frozenset(
    {"lease", "layout", "partition", "cordon", "uncordon", "attest", "rotate-certificate",
     "commands", "policy", "command-key"}
)  # fmt: skip


def _common(sub: argparse.ArgumentParser, *, node: bool = True) -> None:
    if node:
        sub.add_argument("--node", required=True, help="the node's id")
    sub.add_argument(
        "--timeout", type=float, default=0.0, metavar="S",
        help="wait up to S seconds for the result (default: the controller's command_timeout_s)",
    )  # fmt: skip
    sub.add_argument(
        "--command-ttl", dest="command_ttl", type=float, default=0.0, metavar="S",
        help="the command is valid S seconds (at most 600; default the controller's)",
    )  # fmt: skip
    if "--json" not in sub._option_string_actions:
        add_output(sub)


def add_parsers(ctl_verbs: argparse._SubParsersAction[Any]) -> None:
    lease = ctl_verbs.add_parser("lease", help="grant or release a lease on a node")
    lease_verbs = lease.add_subparsers(dest="lease_verb", required=True)
    grant = lease_verbs.add_parser("grant", help="grant a partition of NODE to a tenant's cgroup")
    grant.add_argument("--tenant", required=True)
    selector = grant.add_mutually_exclusive_group(required=True)
    selector.add_argument("--partition", help="partition UUID")
    selector.add_argument("--profile", help="a MIG profile name, or 'gpu' for a whole GPU")
    grant.add_argument("--cgroup", required=True, help="the tenant's cgroup directory on the node")
    grant.add_argument("--ttl", type=float, default=0.0, help="seconds until the lease expires")
    grant.add_argument("--scrub-policy", choices=["zero", "multi-pass"], default="")
    _common(grant)
    release = lease_verbs.add_parser(
        "release", help="release a lease; prints its scrub certificate"
    )
    release.add_argument("lease_id")
    _common(release)

    layout = ctl_verbs.add_parser("layout", help="apply a MIG layout on a node")
    layout_verbs = layout.add_subparsers(dest="layout_verb", required=True)
    apply = layout_verbs.add_parser("apply", help="same arguments as the local `layout apply`")
    add_layout_arguments(apply)
    _common(apply)

    partition = ctl_verbs.add_parser("partition", help="quarantine or clear a node's partition")
    partition_verbs = partition.add_subparsers(dest="partition_verb", required=True)
    for verb in ("quarantine", "clear"):
        action = partition_verbs.add_parser(verb)
        action.add_argument("uuid")
        action.add_argument("--reason", required=True)
        _common(action)

    for verb, text in (("cordon", "no more grants to the node"), ("uncordon", "grants again")):
        sub = ctl_verbs.add_parser(verb, help=text)
        sub.add_argument("--reason", default="")
        _common(sub)
    _common(ctl_verbs.add_parser("attest", help="a fresh quote from the node, verified now"))
    _common(ctl_verbs.add_parser("rotate-certificate", help="the node renews its certificate now"))

    commands = ctl_verbs.add_parser("commands", help="recent commands and their results")
    commands.add_argument("--node", default="")
    commands.add_argument("--limit", type=int, default=50)
    add_output(commands)

    key = ctl_verbs.add_parser("command-key", help="the key that signs remote commands")
    key_verbs = key.add_subparsers(dest="key_verb", required=True)
    rotate = key_verbs.add_parser(
        "rotate", help="a new key for every node (or the current one again to lagging nodes)"
    )
    add_output(rotate)

    policy = ctl_verbs.add_parser("policy", help="attestation policies of node groups")
    policy_verbs = policy.add_subparsers(dest="policy_verb", required=True)
    set_policy = policy_verbs.add_parser("set", help="the policy (attest make-policy) of a group")
    set_policy.add_argument("--group", required=True)
    set_policy.add_argument("file", type=Path)
    add_output(set_policy)


def run(client: Any, args: argparse.Namespace) -> int:
    from agent.proto.accelguard.v1 import controller_pb2 as pb  # noqa: PLC0415
    from agent.proto.accelguard.v1 import link_pb2  # noqa: PLC0415

    if args.verb == "commands":
        listing = client.list_commands(args.node, args.limit)
        if args.json:
            print_json(message_dict(listing))
        else:
            headers = ("command", "node", "kind", "state", "issued", "result")
            rows = ((c.command_id, c.node_id, c.kind, c.state, table_time(c.issued_at),
                     _result_text(c.result)) for c in listing.commands)  # fmt: skip
            print_table(headers, rows, empty="no commands")
        return 0
    if args.verb == "command-key":
        rotated = client.rotate_command_key()
        if args.json:
            print_json(message_dict(rotated))
        elif rotated.created:
            print(f"new command key {rotated.key_id} (previous {rotated.previous_key_id or '-'}) "
                  f"announced to {len(rotated.announced)} nodes")  # fmt: skip
        else:
            print(f"nodes still on the previous key: the current key {rotated.key_id} was "
                  f"announced again to {', '.join(rotated.announced) or 'none'}; rotate again "
                  "once every node confirmed it (ctl node show: command_key_id)")  # fmt: skip
        for node in rotated.unreachable:
            print(f"{node}: pinned a key older than the previous one; re-enroll it",
                  file=sys.stderr)  # fmt: skip
        return int(ExitCode.OK if not rotated.unreachable else ExitCode.FAILED)
    if args.verb == "policy":
        from agent.runtime.inputs import read_prefix  # noqa: PLC0415

        text = read_prefix(args.file, 64 << 20)
        response = client.set_policy(args.group, text.decode("utf-8", "replace"))
        if args.json:
            print_json(message_dict(response))
        else:
            print(f"policy of group {response.group} set ({response.nodes} nodes in the group)")
        return 0
    request = pb.RunCommandRequest(
        node_id=args.node, timeout_s=args.timeout, ttl_s=args.command_ttl
    )
    if args.verb == "lease" and args.lease_verb == "grant":
        request.grant_lease.CopyFrom(
            link_pb2.GrantLeaseCommand(
                tenant=args.tenant, partition_uuid=args.partition or "",
                profile=args.profile or "", cgroup=args.cgroup, ttl_s=args.ttl,
                scrub_policy=args.scrub_policy,
            )
        )  # fmt: skip
    elif args.verb == "lease":
        request.release_lease.lease_id = args.lease_id
    elif args.verb == "layout":
        request.apply_layout.targets.extend(layout_request(args).targets)
    elif args.verb == "partition":
        body = (
            request.quarantine_partition
            if args.partition_verb == "quarantine"
            else (request.clear_partition)
        )
        body.partition_uuid, body.reason = args.uuid, args.reason
    elif args.verb in ("cordon", "uncordon"):
        getattr(request, args.verb).reason = args.reason
    elif args.verb == "attest":
        request.attest.SetInParent()
    elif args.verb == "rotate-certificate":
        request.rotate_certificate.SetInParent()
    else:  # pragma: no cover - argparse allows only the verbs above
        raise ValidationError(f"unknown verb {args.verb}")
    status = client.run_command(request)
    if args.json:
        print_json(message_dict(status))
    else:
        _print_status(status)
    return _exit_code(status)


def _exit_code(status: Any) -> int:
    if status.state == "done":
        if status.kind == "attest" and status.HasField("verdict") and not status.verdict.passed:
            return int(ExitCode.FAILED)
        return int(status.result.exit_code or ExitCode.OK)
    if status.state == "failed":
        return int(status.result.exit_code or ExitCode.FAILED)
    if status.state == "refused":
        return int(ExitCode.REFUSED)
    if status.state == "expired":
        return int(ExitCode.FAILED)
    return int(ExitCode.RETRY_LATER)


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _result_text(result: Any) -> str:
    text = f"({result.refusal})" if result.refusal else ""
    if result.error:
        text += f"{' ' if text else ''}{result.error}"
    return text


def _print_status(status: Any) -> None:
    result = status.result
    if status.state in ("queued", "sent"):
        where = "delivered, no result yet" if status.delivered else "the node is offline"
        print(f"{status.kind} {status.command_id}: no result within the timeout ({where}); it "
              f"stays queued until {_when(status.not_after)}")  # fmt: skip
        return
    if status.state == "expired":
        how = "without a result" if status.delivered else "undelivered"
        print(f"{status.kind} {status.command_id}: expired {how} at {_when(status.not_after)}")
        return
    if status.state in ("refused", "failed"):
        print(f"{status.kind} {status.command_id} {status.state}: {result.error}",
              file=sys.stderr)  # fmt: skip
        return
    which = result.WhichOneof("result")
    if which == "grant":
        lease, partition = result.grant.lease, result.grant.partition
        print(f"lease {lease.id} granted: {partition.uuid} ({partition.profile}) to "
              f"{lease.tenant} at {lease.cgroup}")  # fmt: skip
    elif which == "partition":
        part = result.partition
        print(f"{part.uuid}: {part.state} {'clean' if part.clean else 'dirty'}"
              + (f" ({part.reason})" if part.reason else ""))  # fmt: skip
        if result.scrub_certificate_json:
            document = json.loads(result.scrub_certificate_json)
            print(json.dumps(document, indent=2, sort_keys=True))
    elif which == "layout":
        for gpu in result.layout.gpus:
            note = f" ({gpu.note})" if gpu.note else ""
            wait = ", waiting for a GPU reset" if gpu.waiting_for_reset else ""
            print(f"gpu {gpu.gpu_index}: kept {len(gpu.kept)}, created {len(gpu.created)}, "
                  f"destroyed {len(gpu.destroyed)}{wait}{note}")  # fmt: skip
        for hook in result.layout.hooks:
            print(f"hook {hook.phase}: {'ok' if hook.ok else hook.error}")
    elif status.HasField("verdict"):
        verdict = status.verdict
        print(f"attestation {'passed' if verdict.passed else 'FAILED'}")
        for reason in verdict.reasons:
            print(f"  {reason}")
    else:
        print(f"{status.kind}: {result.detail or 'done'}")
