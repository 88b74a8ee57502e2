"""``accelguard``: argument parsing and output only; the work happens in the daemon and services.

Errors print one line on stderr and exit non-zero (2 for rejected input, 1 otherwise); ``--debug``
shows the traceback instead. ``--json`` prints exactly one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from agent import __version__
from agent.attest.commands import (
    add_attest_parser,
    add_bench_attest,
    run_attest,
    run_bench_attest,
)
from agent.config import Config, load_config, to_toml
from agent.errors import (
    AccelguardError,
    ExitCode,
    LayoutError,
    RetryLaterError,
    StoreError,
    ValidationError,
)

PROG = "accelguard"


def _message_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _print_json(document: Any) -> None:
    json.dump(document, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="accelerator isolation agent")
    parser.add_argument(
        "--config", type=Path, help="agent config (default /etc/accelguard/agent.toml)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("agent", help="run the daemon in the foreground")

    status = commands.add_parser("status", help="GPUs, MIG instances and partitions")
    status.add_argument("--json", action="store_true")

    config = commands.add_parser("config", help="configuration")
    config_verbs = config.add_subparsers(dest="verb", required=True)
    config_verbs.add_parser("check", help="validate the config and print the effective one")

    layout = commands.add_parser("layout", help="declarative MIG layouts")
    layout_verbs = layout.add_subparsers(dest="verb", required=True)
    for verb in ("plan", "apply"):
        sub = layout_verbs.add_parser(verb, help=f"{verb} a layout")
        sub.add_argument("--gpu", help="GPU index, comma-separated indices, or 'all'")
        sub.add_argument("--mig", choices=["on", "off"], default="on", help="MIG mode (default on)")
        sub.add_argument(
            "-f", "--file", type=Path, help="mig-parted config file (mig-configs YAML)"
        )
        sub.add_argument("-c", "--config-name", help="which mig-config of --file")
        sub.add_argument("profiles", nargs="*", help="PROFILE=COUNT, e.g. 3g.40gb=2")
        sub.add_argument("--json", action="store_true")
        if verb == "apply":
            sub.add_argument(
                "--wait", type=_seconds, default=0.0, metavar="S",
                help="wait up to S seconds until the GPUs' partitions are clean (exit 75 if not)",
            )  # fmt: skip

    lease = commands.add_parser("lease", help="tenant leases of partitions")
    lease_verbs = lease.add_subparsers(dest="verb", required=True)
    grant = lease_verbs.add_parser("grant", help="give a tenant a clean partition")
    grant.add_argument("--tenant", required=True)
    selector = grant.add_mutually_exclusive_group(required=True)
    selector.add_argument("--partition", help="partition UUID (GPU-... or MIG-...)")
    selector.add_argument(
        "--profile", help="a MIG profile such as 1g.10gb, or 'gpu' for a whole GPU"
    )
    grant.add_argument("--cgroup", required=True, help="the tenant's cgroup directory (absolute)")
    grant.add_argument("--ttl", type=float, default=0.0, help="seconds until the agent releases it")
    grant.add_argument("--scrub-policy", choices=["zero", "multi-pass"], default="",
                       help="how to scrub after this lease (default: the node's)")  # fmt: skip
    grant.add_argument("--json", action="store_true")
    grant.add_argument(
        "--wait", type=_seconds, default=0.0, metavar="S",
        help="if no clean partition is free yet, keep asking for up to S seconds",
    )  # fmt: skip
    release = lease_verbs.add_parser("release", help="revoke, evict, scrub; waits until clean")
    release.add_argument("lease_id")
    release.add_argument("--json", action="store_true")
    lease_list = lease_verbs.add_parser("list", help="live leases")
    lease_list.add_argument("--all", action="store_true", help="include released leases")
    lease_list.add_argument("--json", action="store_true")

    partition = commands.add_parser("partition", help="partitions and quarantine")
    partition_verbs = partition.add_subparsers(dest="verb", required=True)
    partition_list = partition_verbs.add_parser("list", help="state, clean flag, holder")
    partition_list.add_argument("--json", action="store_true")
    for verb, text in (("quarantine", "take out of service"), ("clear", "end a quarantine")):
        action = partition_verbs.add_parser(verb, help=text)
        action.add_argument("uuid")
        action.add_argument("--reason", required=True)
        action.add_argument("--json", action="store_true")

    state = commands.add_parser("state", help="the agent's journal")
    state_verbs = state.add_subparsers(dest="verb", required=True)
    state_verbs.add_parser(
        "recover",
        help="set a corrupt journal aside; the agent then starts with every partition quarantined",
    )

    scrub = commands.add_parser("scrub", help="scrub certificates")
    scrub_verbs = scrub.add_subparsers(dest="verb", required=True)
    certs = scrub_verbs.add_parser("certs", help="the node's signed scrub certificates")
    certs.add_argument("--partition", default="", help="only this partition's")
    certs.add_argument("--json", action="store_true")
    verify_cert = scrub_verbs.add_parser("verify-cert", help="check a certificate offline")
    verify_cert.add_argument("file", type=Path, help="one certificate (an element of certs --json)")
    verify_cert.add_argument(
        "--public-key", type=Path, help="the signing node's public key PEM (default: this node's)"
    )

    sim = commands.add_parser("sim", help="the simulated node (no GPU needed)")
    sim_verbs = sim.add_subparsers(dest="verb", required=True)
    init = sim_verbs.add_parser("init", help="build a simulated node under a directory")
    init.add_argument("--dir", type=Path, required=True)
    init.add_argument("--topology", default="h100x2", help="e.g. h100x2, a100x2, h100x1,a100-80x1")
    init.add_argument("--cgroup-parent", type=Path, action="append", default=[],
                      help="cgroup under which tenant cgroups must live (repeatable)")  # fmt: skip
    init.add_argument("--mig-off", action="store_true", help="start with MIG mode disabled")
    init.add_argument("--slice-mib", type=int, default=16, help="simulated bytes per memory slice")
    write = sim_verbs.add_parser("write", help="a tenant fills its partition with a pattern")
    write.add_argument("--partition", required=True)
    write.add_argument("--pattern", required=True)
    read = sim_verbs.add_parser("read", help="a tenant searches every byte it can reach")
    read.add_argument("--partition", required=True)
    read.add_argument("--find", required=True)
    read.add_argument("--json", action="store_true")
    reset = sim_verbs.add_parser("reset-gpu", help="simulate the operator's GPU reset")
    reset.add_argument("--gpu", type=int, required=True)
    hold = sim_verbs.add_parser("hold", help="a tenant process using the partition until killed")
    hold.add_argument("--partition", required=True)
    hold.add_argument("--cgroup", type=Path, help="join this cgroup first")
    hold.add_argument("--ignore-sigterm", action="store_true")

    add_attest_parser(commands)

    bench = commands.add_parser("bench", help="benchmarks (JSON with a same-run baseline)")
    bench_verbs = bench.add_subparsers(dest="verb", required=True)
    bench_layout = bench_verbs.add_parser("layout", help="apply/tear down a 7-instance layout")
    bench_layout.add_argument("--rounds", type=int, default=20)
    bench_layout.add_argument("--dir", type=Path, help="scratch directory (default: a temp dir)")
    bench_lease = bench_verbs.add_parser("lease", help="grant and release-to-clean latency")
    bench_lease.add_argument("--rounds", type=int, default=50)
    bench_lease.add_argument("--dir", type=Path, help="scratch directory (default: a temp dir)")
    bench_scrub = bench_verbs.add_parser("scrub", help="scrub bandwidth against memset")
    bench_scrub.add_argument("--rounds", type=int, default=3)
    bench_scrub.add_argument("--dir", type=Path, help="scratch directory (default: a temp dir)")
    add_bench_attest(bench_verbs)
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite, non-negative number of seconds")
    return value


def _layout_request(args: argparse.Namespace) -> Any:
    from agent.hw.migparted import load_mig_parted_file  # noqa: PLC0415
    from agent.hw.migplan import parse_layout_spec  # noqa: PLC0415
    from agent.proto.accelguard.v1 import admin_pb2 as pb  # noqa: PLC0415

    if args.file is not None:
        if args.gpu is not None or args.profiles or not args.config_name:
            raise LayoutError("use either -f FILE -c NAME, or --gpu N|all PROFILE=COUNT...")
        entries = load_mig_parted_file(args.file, args.config_name)
        targets = [
            pb.LayoutTarget(
                all_gpus=entry.devices == "all",
                gpu_indices=[] if entry.devices == "all" else list(entry.devices),
                device_filter=list(entry.device_filter),
                mig_enabled=entry.mig_enabled,
                counts=dict(entry.mig_devices),
            )
            for entry in entries
        ]
        return pb.LayoutRequest(targets=targets)
    if args.gpu is None:
        raise LayoutError(
            "say which GPUs: --gpu N, --gpu 0,1 or --gpu all (or use -f FILE -c NAME)"
        )
    counts = parse_layout_spec(args.profiles)
    if args.mig == "off" and any(counts.values()):
        raise LayoutError("--mig off takes no PROFILE=COUNT")
    if args.gpu == "all":
        indices: list[int] = []
    else:
        try:
            indices = [int(item) for item in args.gpu.split(",")]
        except ValueError:
            raise LayoutError(
                f"--gpu {args.gpu!r}: expected an index, a comma list or 'all'"
            ) from None
        if any(i < 0 for i in indices):
            raise LayoutError(f"--gpu {args.gpu!r}: GPU indices are not negative")
    return pb.LayoutRequest(
        targets=[
            pb.LayoutTarget(
                all_gpus=args.gpu == "all",
                gpu_indices=indices,
                mig_enabled=args.mig == "on",
                counts=counts,
            )
        ]
    )


def _client(config: Config) -> Any:
    from agent.client import AdminClient  # noqa: PLC0415

    return AdminClient(config.admin.socket)


def _print_status(status: Any) -> None:
    print(f"node {status.node_id}  agent {status.agent_version}  driver {status.driver_version}")
    key = "".join(status.node_public_key.splitlines()[1:-1])
    print(f"node key (Ed25519, signs scrub certificates): {key}")
    states = {p.uuid: p for p in status.partitions}
    for gpu in status.gpus:
        mig = "on" if gpu.mig_mode.current else "off"
        if gpu.reset_required:
            mig += f" (pending {'on' if gpu.mig_mode.pending else 'off'}: GPU reset required)"
        print(f"GPU {gpu.index}  {gpu.uuid}  {gpu.name}  MIG {mig}")
        whole = states.get(gpu.uuid)
        if whole is not None:
            print(f"  partition {whole.uuid}  {whole.state}  {'clean' if whole.clean else 'dirty'}")
        for inst in gpu.instances:
            part = states.get(inst.uuid)
            state = f"{part.state}  {'clean' if part.clean else 'dirty'}" if part else "no CI"
            print(
                f"  {inst.profile:<12} GI {inst.gpu_instance_id:<2} CI {inst.compute_instance_id}  "
                f"placement {inst.placement_start}:{inst.placement_size}  "
                f"{inst.uuid or '-'}  {state}"
            )


def _print_layout(response: Any, applied: bool) -> None:
    for gpu in response.gpus:
        verb = "unchanged" if gpu.noop else ("applied" if applied else "plan")
        print(f"GPU {gpu.gpu_index}: {verb}")
        for label, items in (
            ("keep", gpu.kept),
            ("destroy", gpu.destroyed),
            ("create", gpu.created),
        ):
            for inst in items:
                where = f"{inst.placement_start}:{inst.placement_size}"
                print(f"  {label:<8} {inst.profile:<12} placement {where} {inst.uuid}")
        if gpu.note:
            print(f"  note: {gpu.note}")


def _run(args: argparse.Namespace) -> int:
    if args.command == "sim" and args.verb == "init":  # needs no config: it writes one
        from agent.sim.node import init_sim_node  # noqa: PLC0415

        if not 1 <= args.slice_mib <= 1024:
            raise ValidationError("--slice-mib must be between 1 and 1024")
        node = init_sim_node(
            args.dir, args.topology, args.cgroup_parent, not args.mig_off, args.slice_mib << 20
        )
        print(f"simulated node with {len(node.gpus)} GPUs ({', '.join(node.gpus)}) in {node.root}")
        print(f"config: {node.config_path}")
        return 0
    if args.command == "bench" and args.verb == "attest":
        _print_json(run_bench_attest(args))
        return 0
    if args.command == "bench":
        from agent import bench  # noqa: PLC0415

        if args.rounds < 1:
            raise ValidationError("--rounds must be at least 1")
        runners: dict[str, Callable[[int, Path | None], dict[str, Any]]] = {
            "layout": bench.bench_layout,
            "lease": bench.bench_lease,
            "scrub": bench.bench_scrub,
        }
        runner = runners[args.verb]
        _print_json(runner(args.rounds, args.dir))
        return 0

    if args.command == "scrub" and args.verb == "verify-cert":  # offline: no config, no agent
        return _verify_certificate(args)
    config = load_config(args.config)
    if args.command == "config":
        print(to_toml(config), end="")
        return 0
    if args.command == "attest":
        return run_attest(args, config)
    if args.command == "state":
        return _recover_state(config)
    if args.command == "agent":
        from agent.daemon import run_daemon  # noqa: PLC0415
        from agent.logs import configure_logging  # noqa: PLC0415

        configure_logging(config.logging)
        return run_daemon(config)
    if args.command == "status":
        with _client(config) as client:
            status = client.status()
        if args.json:
            _print_json(_message_dict(status))
        else:
            _print_status(status)
        return 0
    if args.command == "layout":
        request = _layout_request(args)
        with _client(config) as client:
            if args.verb == "apply":
                response = client.apply_layout(request)
            else:
                response = client.plan_layout(request)
            if args.json:
                _print_json(_message_dict(response))
            else:
                _print_layout(response, args.verb == "apply")
            if args.verb == "apply" and args.wait > 0:
                return _wait_layout_clean(client, {g.gpu_index for g in response.gpus}, args.wait)
        return 0
    if args.command == "lease":
        return _lease(config, args)
    if args.command == "partition":
        return _partition(config, args)
    if args.command == "sim":
        return _sim(config, args)
    if args.command == "scrub":
        return _certificates(config, args)
    raise AssertionError(f"unhandled command {args.command}")  # pragma: no cover


def _emit(args: argparse.Namespace, message: Message, text: str) -> None:
    if args.json:
        _print_json(_message_dict(message))
    else:
        print(text)


def _partition_line(p: Any) -> str:
    state = p.state if p.state != "free" else ("free  clean" if p.clean else "free  dirty")
    holder = f"  lease {p.holder}" if p.holder else ""
    reason = f"  ({p.reason})" if p.reason else ""
    return f"{p.uuid}  GPU {p.gpu_index}  {p.profile or 'whole GPU'}  {state}{holder}{reason}"


def _lease_line(lease: Any) -> str:
    expiry = f"  expires {lease.expires_at:.0f}" if lease.expires_at else ""
    return (
        f"{lease.id}  {lease.tenant}  {lease.partition_uuid}  {lease.state}  {lease.cgroup}{expiry}"
    )


def _progress(text: str) -> None:
    """One updating line on a terminal; nothing when stderr is not one (scripts, logs)."""
    if sys.stderr.isatty():
        sys.stderr.write(f"\r{text}\033[K")
        sys.stderr.flush()


def _grant_waiting(client: Any, request: Any, wait_s: float) -> Any:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            response = client.grant_lease(request)
        except RetryLaterError as error:
            left = deadline - time.monotonic()
            if left <= 0:
                _progress("")
                raise
            _progress(f"waiting for a clean partition ({left:.0f}s left): {error}")
            time.sleep(min(0.5, left))
            continue
        _progress("")
        return response


def _wait_layout_clean(client: Any, gpu_indices: set[int], wait_s: float) -> int:
    """Wait until every partition of the GPUs is free and clean (0), or one is quarantined."""
    deadline = time.monotonic() + wait_s
    while True:
        partitions = [p for p in client.list_partitions().partitions if p.gpu_index in gpu_indices]
        quarantined = [p for p in partitions if p.state == "quarantined"]
        pending = [p for p in partitions if not (p.state == "free" and p.clean)]
        if quarantined:
            _progress("")
            for partition in quarantined:
                print(f"quarantined: {_partition_line(partition)}", file=sys.stderr)
            return int(ExitCode.QUARANTINED)
        if not pending:
            _progress("")
            return int(ExitCode.OK)
        left = deadline - time.monotonic()
        if left <= 0:
            _progress("")
            print(
                f"{PROG}: {len(pending)} partitions not clean yet after {wait_s:g}s",
                file=sys.stderr,
            )
            return int(ExitCode.RETRY_LATER)
        _progress(f"waiting for {len(pending)} partitions to be scrubbed ({left:.0f}s left)")
        time.sleep(min(0.2, left))


def _release_exit(partition: Any) -> int:
    """0 only for the safe outcome asked for: released and clean."""
    if partition.state == "free" and partition.clean:
        return int(ExitCode.OK)
    return int(ExitCode.QUARANTINED)


def _lease(config: Config, args: argparse.Namespace) -> int:
    from agent.proto.accelguard.v1 import admin_pb2 as pb  # noqa: PLC0415

    with _client(config) as client:
        if args.verb == "grant":
            request = pb.GrantLeaseRequest(
                tenant=args.tenant,
                cgroup=args.cgroup,
                ttl_s=args.ttl,
                scrub_policy=args.scrub_policy,
            )
            if args.partition:
                request.partition_uuid = args.partition
            else:
                request.profile = args.profile
            response = _grant_waiting(client, request, args.wait)
            nodes = "\n".join(f"  {n}" for n in response.partition.device_nodes)
            _emit(args, response, f"{response.lease.id}  {response.partition.uuid}\n{nodes}")
        elif args.verb == "release":
            partition = client.release_lease(args.lease_id)
            _emit(args, partition, _partition_line(partition))
            return _release_exit(partition)
        else:
            leases = client.list_leases(include_released=args.all)
            _emit(args, leases, "\n".join(_lease_line(lease) for lease in leases.leases))
    return 0


def _partition(config: Config, args: argparse.Namespace) -> int:
    with _client(config) as client:
        if args.verb == "list":
            partitions = client.list_partitions()
            _emit(args, partitions, "\n".join(_partition_line(p) for p in partitions.partitions))
            return 0
        if args.verb == "quarantine":
            partition = client.quarantine(args.uuid, args.reason)
        else:
            partition = client.clear(args.uuid, args.reason)
        _emit(args, partition, _partition_line(partition))
    if args.verb == "quarantine":
        return int(ExitCode.OK)
    return _release_exit(partition)


def _recover_state(config: Config) -> int:
    """Set a damaged journal aside, under the agent's own lock (refused while it runs)."""
    from agent.runtime.statedir import StateDirLock  # noqa: PLC0415

    lock = StateDirLock(config.node.state_dir)
    lock.acquire("recovery")
    try:
        journal = config.node.store_path
        stamp = time.strftime("%Y%m%dT%H%M%S")
        moved = []
        for suffix in ("", "-wal", "-shm"):
            source = journal.with_name(journal.name + suffix)
            if source.exists():
                target = source.with_name(f"{journal.name}.damaged-{stamp}{suffix}")
                try:
                    source.rename(target)
                except OSError as error:
                    raise StoreError(f"cannot move {source} aside: {error.strerror}") from error
                moved.append(target)
    finally:
        lock.release()
    if not moved:
        print(f"no journal at {journal}: nothing to recover")
        return int(ExitCode.OK)
    for path in moved:
        print(f"kept {path}")
    print(
        "the next `accelguard agent` starts a new journal with every partition quarantined "
        "(the node's key is older than it); inspect, then `accelguard partition clear` each "
        "partition to scrub it"
    )
    return int(ExitCode.OK)


def _certificates(config: Config, args: argparse.Namespace) -> int:
    with _client(config) as client:
        documents = [json.loads(text) for text in client.certificates(args.partition)]
    if args.json:
        _print_json(documents)
        return 0
    for document in documents:
        payload = document["payload"]
        verdict = "verified" if payload["verified"] else "NOT verified"
        print(
            f"{payload['finished_at']}  {payload['partition_uuid']}  {verdict}  "
            f"coverage {payload['coverage']}  lease {payload['previous_lease_id'] or '-'}"
        )
    return 0


def _verify_certificate(args: argparse.Namespace) -> int:
    from agent.inputs import read_bounded, read_json_file  # noqa: PLC0415
    from agent.scrub.certificate import (  # noqa: PLC0415
        CERTIFICATE_JSON_LIMITS,
        MAX_PUBLIC_KEY_FILE_BYTES,
        verify_certificate,
    )

    if args.public_key is not None:
        raw = read_bounded(args.public_key, MAX_PUBLIC_KEY_FILE_BYTES, "public key")
        try:
            trusted = raw.decode("ascii")
        except UnicodeDecodeError:
            raise ValidationError(f"public key {args.public_key}: not a PEM file") from None
        source = f"the key in {args.public_key}"
    else:
        trusted, source = _own_node_public_key(args)
    document = read_json_file(args.file, CERTIFICATE_JSON_LIMITS, "certificate")
    checked = verify_certificate(document, trusted)
    payload = checked.payload
    print(
        f"signature OK ({source}, {checked.key_fingerprint}): {payload['partition_uuid']} "
        f"scrubbed {'and verified' if checked.scrub_verified else 'but NOT verified'}, "
        f"coverage {payload['coverage']}"
    )
    return 0 if checked.scrub_verified else 1


def _own_node_public_key(args: argparse.Namespace) -> tuple[str, str]:
    """This node's public key, for verify-cert without --public-key. The certificate's embedded
    key is never the fallback: anyone can re-sign an edited payload and embed their own key."""
    from agent.scrub.certificate import NODE_KEY_FILE, NodeKey  # noqa: PLC0415

    hint = "pass --public-key FILE with the signing node's key (`accelguard status` prints it)"
    try:
        path = load_config(args.config).node.state_dir / NODE_KEY_FILE
    except AccelguardError as error:
        raise ValidationError(f"no key to verify against ({error}); {hint}") from error
    try:
        key = NodeKey.load(path)
    except AccelguardError as error:
        raise ValidationError(f"no key to verify against ({error}); {hint}") from error
    return key.public_pem(), f"this node's key {path}"


def _sim(config: Config, args: argparse.Namespace) -> int:
    from agent.sim import workload  # noqa: PLC0415

    if args.verb == "write":
        region = workload.write_pattern(config, args.partition, args.pattern)
        print(f"wrote {region.length} bytes to {args.partition}")
    elif args.verb == "read":
        region, count = workload.find_pattern(config, args.partition, args.find)
        if args.json:
            _print_json({"partition": args.partition, "bytes_read": region.length, "count": count})
        else:
            print(f"{count} occurrences in {region.length} bytes")
    elif args.verb == "reset-gpu":
        workload.reset_gpu(config, args.gpu)
        print(f"GPU {args.gpu} reset (simulated)")
    else:
        workload.hold(config, args.partition, args.cgroup, args.ignore_sigterm)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    problem = _non_utf8_argument(arguments)
    if problem is not None:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return int(ExitCode.REFUSED)
    args = build_parser().parse_args(arguments)
    from agent.config import LoggingConfig  # noqa: PLC0415
    from agent.logs import configure_logging  # noqa: PLC0415

    # Library logs go to stderr and only when they matter; stdout is for the command's output
    # (one JSON document with --json). `accelguard agent` reconfigures from its config.
    configure_logging(LoggingConfig(level="warning", format="console"))
    try:
        return _run(args)
    except (AccelguardError, ExceptionGroup) as raised:
        error = _first_accelguard_error(raised)
        if args.debug or error is None:
            raise
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    except (RecursionError, MemoryError) as error:
        # Inputs are bounded before they are parsed (agent/inputs.py), so this is a bound that is
        # missing somewhere: still one line, not a traceback of a thousand frames.
        if args.debug:
            raise
        print(
            f"{PROG}: error: input too large or too deeply nested ({type(error).__name__}); "
            "--debug shows where",
            file=sys.stderr,
        )
        return int(ExitCode.FAILED)


def _non_utf8_argument(arguments: Sequence[str]) -> str | None:
    """Why an argument is refused, or None. Python hands over argv bytes that are not UTF-8 as
    lone surrogates (PEP 383), and those fail only much later -- encoding a protobuf string, a
    JSON document, a log line -- with a traceback."""
    encoding = sys.getfilesystemencoding()
    for position, argument in enumerate(arguments, start=1):
        try:
            # The bytes as given (what os.fsencode returns, in any locale) must be UTF-8.
            raw = argument.encode(encoding, "surrogateescape")
            raw.decode("utf-8")
            continue
        except UnicodeEncodeError:  # a surrogate no byte decodes to: passed in, not from argv
            raw = argument.encode("utf-8", "backslashreplace")
        except UnicodeDecodeError:
            pass
        after = ""
        if position > 1 and arguments[position - 2].startswith("-"):
            after = f" (after {arguments[position - 2][:40]})"
        return (
            f"argument {position}, {raw[:60]!r}{after}, is not valid UTF-8; "
            "arguments must be UTF-8 text"
        )
    return None


def _first_accelguard_error(raised: BaseException) -> AccelguardError | None:
    """The error to report; a daemon service that failed arrives wrapped by its TaskGroup."""
    if isinstance(raised, AccelguardError):
        return raised
    if isinstance(raised, BaseExceptionGroup):
        for inner in raised.exceptions:
            found = _first_accelguard_error(inner)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
