"""``accelguard lease grant|release|list`` and ``partition list|quarantine|clear``.

Exit codes are the scripting contract (agent.errors.ExitCode): a release or a clear exits 0 only
when the partition ended free and clean, 3 when it ended quarantined.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from agent.cli.output import (
    PARTITION_HEADERS,
    add_output,
    emit,
    partition_line,
    partition_row,
    print_table,
    progress,
    table_time,
)
from agent.config import Config, load_config
from agent.errors import ExitCode, RetryLaterError
from agent.runtime.durations import human_duration
from agent.runtime.inputs import seconds


def add_parsers(commands: argparse._SubParsersAction[Any]) -> None:
    lease = commands.add_parser("lease", help="tenant leases of partitions")
    lease_verbs = lease.add_subparsers(dest="verb", required=True)
    grant = lease_verbs.add_parser("grant", help="give a tenant a clean partition")
    grant.add_argument("--tenant", required=True)
    selector = grant.add_mutually_exclusive_group(required=True)
    selector.add_argument("--partition", help="partition UUID (GPU-... or MIG-...)")
    selector.add_argument(
        "--profile", help="a MIG profile such as 1g.10gb, or 'gpu' for a whole GPU"
    )
    where = grant.add_mutually_exclusive_group(required=True)
    where.add_argument("--cgroup", help="the tenant's cgroup directory (absolute)")
    where.add_argument(
        "--bind-later", action="store_true",
        help="take the partition now, fence the cgroup when it exists (`lease bind`)",
    )  # fmt: skip
    grant.add_argument("--ttl", type=seconds, default=0.0, metavar="DURATION",
                       help="until the agent releases it: seconds, or 15m, 2h, 30d")  # fmt: skip
    grant.add_argument("--scrub-policy", choices=["zero", "multi-pass"], default="",
                       help="how to scrub after this lease (default: the node's)")  # fmt: skip
    add_output(grant)
    grant.add_argument(
        "--wait", type=seconds, default=0.0, metavar="S",
        help="if no clean partition is free yet, keep asking for up to S seconds",
    )  # fmt: skip
    bind = lease_verbs.add_parser("bind", help="fence the cgroup of a --bind-later lease")
    bind.add_argument("lease_id")
    bind.add_argument("--cgroup", required=True, help="the tenant's cgroup directory (absolute)")
    add_output(bind)
    release = lease_verbs.add_parser("release", help="revoke, evict, scrub; waits until clean")
    release.add_argument("lease_id")
    add_output(release)
    lease_list = lease_verbs.add_parser("list", help="live leases")
    lease_list.add_argument("--all", action="store_true", help="include released leases")
    add_output(lease_list, wide=True)

    partition = commands.add_parser("partition", help="partitions and quarantine")
    partition_verbs = partition.add_subparsers(dest="verb", required=True)
    partition_list = partition_verbs.add_parser("list", help="state, clean flag, holder")
    add_output(partition_list)
    for verb, text in (("quarantine", "take out of service"), ("clear", "end a quarantine")):
        action = partition_verbs.add_parser(verb, help=text)
        action.add_argument("uuid")
        action.add_argument("--reason", required=True)
        add_output(action)


def run(args: argparse.Namespace, config: Config | None = None) -> int:
    if config is None:
        config = load_config(args.config)
    from agent.admin.client import AdminClient  # noqa: PLC0415

    with AdminClient(config.admin.socket) as client:
        if args.command == "lease":
            return _lease(client, args)
        return _partition(client, args)


def _lease(client: Any, args: argparse.Namespace) -> int:
    from agent.proto.accelguard.v1 import admin_pb2 as pb  # noqa: PLC0415

    if args.verb == "grant":
        request = pb.GrantLeaseRequest(
            tenant=args.tenant,
            cgroup=args.cgroup or "",
            ttl_s=args.ttl,
            scrub_policy=args.scrub_policy,
            bind_later=args.bind_later,
        )
        if args.partition:
            request.partition_uuid = args.partition
        else:
            request.profile = args.profile
        response = _grant_waiting(client, request, args.wait)
        nodes = "\n".join(f"  {n}" for n in response.partition.device_nodes)
        # An older agent sends no CDI name.
        cdi = f"\nCDI device: {response.cdi_device}" if response.cdi_device else ""
        emit(args, response, f"{response.lease.id}  {response.partition.uuid}\n{nodes}{cdi}")
    elif args.verb == "bind":
        lease = client.bind_lease(args.lease_id, args.cgroup)
        emit(args, lease, f"{lease.id}  {lease.partition_uuid}  bound to {lease.cgroup}")
    elif args.verb == "release":
        partition = client.release_lease(args.lease_id)
        emit(args, partition, partition_line(partition))
        return _release_exit(partition)
    else:
        leases = client.list_leases(include_released=args.all)
        if args.json:
            emit(args, leases, "")
        else:
            wide = args.output_format == "wide"
            headers = LEASE_HEADERS + (LEASE_WIDE_HEADERS if wide else ())
            rows = (_lease_row(lease, time.time(), wide=wide) for lease in leases.leases)
            print_table(headers, rows, empty="no leases" if args.all else "no live leases")
    return 0


def _partition(client: Any, args: argparse.Namespace) -> int:
    if args.verb == "list":
        partitions = client.list_partitions()
        if args.json:
            emit(args, partitions, "")
        else:
            rows = (partition_row(p) for p in partitions.partitions)
            print_table(PARTITION_HEADERS, rows, empty="no partitions")
        return 0
    if args.verb == "quarantine":
        partition = client.quarantine(args.uuid, args.reason)
        emit(args, partition, partition_line(partition))
        return int(ExitCode.OK)
    partition = client.clear(args.uuid, args.reason)
    emit(args, partition, partition_line(partition))
    return _release_exit(partition)


LEASE_HEADERS = ("id", "tenant", "partition", "state", "age", "expires")
LEASE_WIDE_HEADERS = ("cgroup", "created", "released", "release reason")


def _lease_row(lease: Any, now: float, *, wide: bool) -> tuple[Any, ...]:
    age = human_duration(max(0.0, now - lease.created_at)) if lease.created_at else None
    expires = None
    if lease.expires_at and lease.state != "released":
        left = lease.expires_at - now
        expires = f"in {human_duration(left)}" if left > 0 else "due"
    row: tuple[Any, ...] = (lease.id, lease.tenant, lease.partition_uuid, lease.state, age, expires)
    if wide:
        created, released = table_time(lease.created_at), table_time(lease.released_at)
        row += (lease.cgroup, created, released, lease.release_reason)
    return row


def _grant_waiting(client: Any, request: Any, wait_s: float) -> Any:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            response = client.grant_lease(request)
        except RetryLaterError as error:
            left = deadline - time.monotonic()
            if left <= 0:
                progress("")
                raise
            progress(f"waiting for a clean partition ({left:.0f}s left): {error}")
            time.sleep(min(0.5, left))
            continue
        progress("")
        return response


def _release_exit(partition: Any) -> int:
    """0 only for the safe outcome asked for: released and clean."""
    if partition.state == "free" and partition.clean:
        return int(ExitCode.OK)
    return int(ExitCode.QUARANTINED)
