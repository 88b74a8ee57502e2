"""``accelguard sim ...``: the simulated node (no GPU needed) and its tenants' workloads.

``sim init`` writes a node and its config, so it needs none; ``sim tpm`` gives the node at
``--dir`` a booted software TPM (agent/sim/tpm.py) until it is stopped; the other verbs act on
the node a config names.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.cli.output import add_output, print_json
from agent.config import Config, load_config
from agent.errors import ValidationError


def add_parsers(commands: argparse._SubParsersAction[Any]) -> None:
    sim = commands.add_parser("sim", help="the simulated node (no GPU needed)")
    sim_verbs = sim.add_subparsers(dest="verb", required=True)
    init = sim_verbs.add_parser("init", help="build a simulated node under a directory")
    init.add_argument("--dir", type=Path, required=True)
    init.add_argument(
        "--topology", default="h100x2",
        help="e.g. h100x2, a100x2, h100x1,a100-80x1, ascend910x8, ascend910bx8, accel2, "
        "h100x1,ascend910bx2",
    )  # fmt: skip
    init.add_argument("--cgroup-parent", type=Path, action="append", default=[],
                      help="cgroup under which tenant cgroups must live (repeatable)")  # fmt: skip
    init.add_argument("--mig-off", action="store_true", help="start with MIG mode disabled")
    init.add_argument("--slice-mib", type=int, default=16, help="simulated bytes per memory slice")
    tpm = sim_verbs.add_parser(
        "tpm", help="a software TPM booted with a real event log, until stopped (Ctrl-C)"
    )
    tpm.add_argument("--dir", type=Path, required=True, help="the simulated node (sim init --dir)")
    tpm.add_argument(
        "--event-log", type=Path, required=True,
        help="a real firmware event log (e.g. a copy of this host's binary_bios_measurements)",
    )  # fmt: skip
    write = sim_verbs.add_parser("write", help="a tenant fills its partition with a pattern")
    write.add_argument("--partition", required=True)
    write.add_argument("--pattern", required=True)
    read = sim_verbs.add_parser("read", help="a tenant searches every byte it can reach")
    read.add_argument("--partition", required=True)
    read.add_argument("--find", required=True)
    add_output(read)
    reset = sim_verbs.add_parser("reset-gpu", help="simulate the operator's GPU reset")
    reset.add_argument("--gpu", type=int, required=True)
    hold = sim_verbs.add_parser("hold", help="a tenant process using the partition until killed")
    hold.add_argument("--partition", required=True)
    hold.add_argument("--cgroup", type=Path, help="join this cgroup first")
    hold.add_argument("--ignore-sigterm", action="store_true")
    _add_inject_parsers(sim_verbs)


def _add_inject_parsers(sim_verbs: argparse._SubParsersAction[Any]) -> None:
    inject = sim_verbs.add_parser("inject", help="inject a GPU fault into the simulated node")
    faults = inject.add_subparsers(dest="fault", required=True)
    xid = faults.add_parser("xid", help="an XID error event")
    xid.add_argument("--gpu", type=int, required=True)
    xid.add_argument("--xid", type=int, required=True)
    xid.add_argument("--gi", type=int, help="GPU instance id (with --ci)")
    xid.add_argument("--ci", type=int, help="compute instance id (with --gi)")
    ecc = faults.add_parser("ecc", help="set an ECC error counter (volatile and aggregate)")
    ecc.add_argument("--gpu", type=int, required=True)
    kind = ecc.add_mutually_exclusive_group(required=True)
    kind.add_argument("--sbe", type=int, metavar="COUNT", help="single-bit (corrected) errors")
    kind.add_argument("--dbe", type=int, metavar="COUNT", help="double-bit (uncorrected) errors")
    remap = faults.add_parser(
        "remap", help="set the row-remapping flags (a flag not given is cleared)"
    )
    remap.add_argument("--gpu", type=int, required=True)
    remap.add_argument("--pending", action="store_true", help="a remapping awaits a GPU reset")
    remap.add_argument("--failure", action="store_true", help="a remapping has failed")
    remap.add_argument("--clear", action="store_true", help="clear both flags")
    lost = faults.add_parser("lost", help="the GPU falls off the bus (and logs XID 79)")
    lost.add_argument("--gpu", type=int, required=True)
    lost.add_argument("--clear", action="store_true", help="bring the GPU back")
    temperature = faults.add_parser("temperature", help="set the GPU temperature")
    temperature.add_argument("--gpu", type=int, required=True)
    temperature.add_argument("celsius", type=int, help="degrees Celsius")


def run(args: argparse.Namespace, config: Config | None = None) -> int:
    if args.verb == "init":
        return _init(args)
    if args.verb == "tpm":
        return _tpm(args)
    if config is None:
        config = load_config(args.config)
    if args.verb == "inject":
        return _inject(args, config)
    from agent.sim import workload  # noqa: PLC0415

    if args.verb == "write":
        region = workload.write_pattern(config, args.partition, args.pattern)
        print(f"wrote {region.length} bytes to {args.partition}")
    elif args.verb == "read":
        region, count = workload.find_pattern(config, args.partition, args.find)
        if args.json:
            print_json({"partition": args.partition, "bytes_read": region.length, "count": count})
        else:
            print(f"{count} occurrences in {region.length} bytes")
    elif args.verb == "reset-gpu":
        workload.reset_gpu(config, args.gpu)
        print(f"GPU {args.gpu} reset (simulated)")
    else:
        workload.hold(config, args.partition, args.cgroup, args.ignore_sigterm)
    return 0


def _init(args: argparse.Namespace) -> int:
    from agent.sim.node import init_sim_node  # noqa: PLC0415

    if not 1 <= args.slice_mib <= 1024:
        raise ValidationError("--slice-mib must be between 1 and 1024")
    node = init_sim_node(
        args.dir, args.topology, args.cgroup_parent, not args.mig_off, args.slice_mib << 20
    )
    print(f"simulated node with {node.describe()} in {node.root}")
    print(f"config: {node.config_path}")
    return 0


def _tpm(args: argparse.Namespace) -> int:
    """Foreground: boot the TPM, point the node's config at it, wait for SIGINT or SIGTERM."""
    import signal  # noqa: PLC0415

    from agent.sim.tpm import start_sim_tpm  # noqa: PLC0415

    def stopped(signum: int, frame: object) -> None:  # noqa: ARG001 - a signal handler's
        raise SystemExit(0)  # unwinds through the finally below (and start_sim_tpm's own)

    # SIGINT stays KeyboardInterrupt (exit 130); either way the swtpm child is stopped.
    signal.signal(signal.SIGTERM, stopped)
    tpm = start_sim_tpm(args.dir, args.event_log)
    try:
        config = args.dir / "agent.toml"
        print(f"swtpm at {tpm.tcti}, booted with {args.event_log}")
        print(f"{config}: [attest] now uses it, quoting {tpm.selection}")
        if tpm.excluded:
            print(
                "PCR 0 left out: the log starts it at a locality swtpm cannot boot from "
                "(a StartupLocality or H-CRTM event)"
            )
        print(f"try: accelguard --config {config} attest quote --nonce 00112233 -o ev.json")
        print(f"     accelguard attest make-policy {tpm.event_log} -o policy.json")
        print("     accelguard attest verify ev.json --nonce 00112233 --policy policy.json")
        print("ready (Ctrl-C stops the TPM)", flush=True)
        while True:
            signal.pause()
    finally:
        tpm.stop()
    return 0


def _inject(args: argparse.Namespace, config: Config) -> int:
    from agent.sim import inject  # noqa: PLC0415

    if not config.nvml.sim_dir:
        raise ValidationError("sim inject needs a simulated node's config (accelguard sim init)")
    sim_dir = Path(config.nvml.sim_dir)
    gpu = args.gpu
    if args.fault == "xid":
        inject.inject_xid(sim_dir, gpu, args.xid, args.gi, args.ci)
        where = "" if args.gi is None else f" (GPU instance {args.gi}, compute instance {args.ci})"
        print(f"injected XID {args.xid} on GPU {gpu}{where}")
    elif args.fault == "ecc":
        kind = inject.EccKind.SBE if args.dbe is None else inject.EccKind.DBE
        count = args.sbe if args.dbe is None else args.dbe
        inject.set_ecc(sim_dir, gpu, kind, count)
        print(
            f"GPU {gpu}: {kind.value.upper()} ECC error count set to {count} (volatile, aggregate)"
        )
    elif args.fault == "remap":
        if args.clear == (args.pending or args.failure):
            raise ValidationError("sim inject remap needs --pending and/or --failure, or --clear")
        inject.set_remap(sim_dir, gpu, args.pending, args.failure)
        print(f"GPU {gpu}: row remapping pending={int(args.pending)} failure={int(args.failure)}")
    elif args.fault == "lost":
        inject.set_lost(sim_dir, gpu, not args.clear)
        if args.clear:
            print(f"GPU {gpu} is back on the bus")
        else:
            print(f"GPU {gpu} fell off the bus (XID 79 injected)")
    else:
        inject.set_temperature(sim_dir, gpu, args.celsius)
        print(f"GPU {gpu}: temperature set to {args.celsius} C")
    return 0
