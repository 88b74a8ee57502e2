"""``accelguard``: argument parsing and output only; the work happens in the daemon and services.

Each verb group is a module of this package with ``add_parsers(commands)``, which adds its
commands, and ``run(args)``, which runs one of them; :func:`build_parser` gives every command of a
group its group's ``run``. Errors print one line on stderr and exit non-zero (2 for rejected
input, 1 otherwise); ``--debug`` shows the traceback instead. ``--json`` prints exactly one JSON
document on stdout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

# Imported by full name: `from agent.cli import attest` would name this package as its own
# dependency (tests/foundation/test_architecture.py reads that as an import cycle).
import agent.cli.attest as attest_verbs
import agent.cli.audit as audit_verbs
import agent.cli.bench as bench_verbs
import agent.cli.controller as controller_verbs
import agent.cli.health as health_verbs
import agent.cli.layout as layout_verbs
import agent.cli.leases as leases_verbs
import agent.cli.link as link_verbs
import agent.cli.node as node_verbs
import agent.cli.scrub as scrub_verbs
import agent.cli.sim as sim_verbs
import agent.cli.state as state_verbs
from agent import __version__
from agent.cli.output import PROG
from agent.errors import AccelguardError, ExitCode
from agent.runtime.inputs import non_utf8_argument

# In the order `accelguard --help` lists their commands.
VERB_GROUPS = (
    node_verbs, layout_verbs, leases_verbs, state_verbs, scrub_verbs, link_verbs,
    controller_verbs, sim_verbs, attest_verbs, bench_verbs, health_verbs, audit_verbs,
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="accelerator isolation agent")
    parser.add_argument(
        "--config", type=Path, help="agent config (default /etc/accelguard/agent.toml)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in VERB_GROUPS:
        before = set(commands.choices)
        group.add_parsers(commands)
        for name in commands.choices.keys() - before:
            commands.choices[name].set_defaults(run=group.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    problem = non_utf8_argument(arguments)
    if problem is not None:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return int(ExitCode.REFUSED)
    args = build_parser().parse_args(arguments)
    from agent.config import LoggingConfig  # noqa: PLC0415
    from agent.runtime.logs import configure_logging  # noqa: PLC0415

    # Library logs go to stderr and only when they matter; stdout is for the command's output
    # (one JSON document with --json). `accelguard agent` reconfigures from its config.
    configure_logging(LoggingConfig(level="warning", format="console"))
    try:
        return int(args.run(args))
    except (AccelguardError, ExceptionGroup) as raised:
        error = _first_accelguard_error(raised)
        if args.debug or error is None:
            raise
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    except (RecursionError, MemoryError) as error:
        # Inputs are bounded before they are parsed (agent/runtime/inputs.py), so this is a bound
        # that is missing somewhere: still one line, not a traceback of a thousand frames.
        if args.debug:
            raise
        print(
            f"{PROG}: error: input too large or too deeply nested ({type(error).__name__}); "
            "--debug shows where",
            file=sys.stderr,
        )
        return int(ExitCode.FAILED)


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
