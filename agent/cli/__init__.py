"""``accelguard``: argument parsing and output only; the work happens in the daemon and services.

Each verb group is a module of this package with ``add_parsers(commands)``, which adds its
commands, and ``run(args)``, which runs one of them; :func:`build_parser` gives every command of a
group its group's ``run``, with the agent's config unless the verb is in :data:`CONFIG_FREE`.
Errors print one line on stderr and exit non-zero (2 for rejected input, 1 otherwise), or with
``--json`` one JSON object on stderr (:func:`~agent.cli.output.print_error`); ``--debug`` shows
the traceback instead. ``--json`` prints exactly one JSON document on stdout. Long options are
never abbreviated: ``--config`` must not quietly mean ``--config-name``. A reader that goes away
(``| head``) ends the command quietly with 141, as it ends any tool SIGPIPE kills.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

# Imported by full name: `from agent.cli import attest` would name this package as its own
# dependency (tests/foundation/test_architecture.py reads that as an import cycle).
import agent.cli.attest as attest_verbs
import agent.cli.audit as audit_verbs
import agent.cli.bench as bench_verbs
import agent.cli.controller as controller_verbs
import agent.cli.fences as fences_verbs
import agent.cli.health as health_verbs
import agent.cli.layout as layout_verbs
import agent.cli.leases as leases_verbs
import agent.cli.link as link_verbs
import agent.cli.node as node_verbs
import agent.cli.scrub as scrub_verbs
import agent.cli.sim as sim_verbs
import agent.cli.slurm as slurm_verbs
import agent.cli.state as state_verbs
from agent import __version__
from agent.cli.output import PROG, error_kind, print_error
from agent.config import LoggingConfig, load_config
from agent.errors import AccelguardError, ExitCode
from agent.runtime.inputs import non_utf8_argument

# In the order `accelguard --help` lists their commands.
VERB_GROUPS = (
    node_verbs, layout_verbs, leases_verbs, fences_verbs, state_verbs, scrub_verbs, link_verbs,
    controller_verbs, sim_verbs, attest_verbs, bench_verbs, health_verbs, audit_verbs, slurm_verbs,
)  # fmt: skip


# Verbs that need no agent config: they read only the files named in their arguments, or have a
# config of their own (the controller's). Every other verb talks to the agent or reads its state
# directory, so a missing config is an error there rather than a silent set of defaults.
CONFIG_FREE: Final = frozenset({
    ("controller", None), ("ctl", None), ("bench", None), ("sim", "init"), ("sim", "tpm"),
    # Writes the config; one existing there is not read (nor replaced without --force).
    ("config", "init"),
    ("attest", "verify"), ("attest", "eventlog"), ("attest", "ima"), ("attest", "make-policy"),
    # Reads this node's key from the state dir only without --public-key, and then says to pass one.
    ("scrub", "verify-cert"),
})  # fmt: skip

# What a shell reports for a process SIGPIPE killed (128 + 13): `yes | head` under pipefail.
EXIT_READER_GONE: Final = 141


class _Parser(argparse.ArgumentParser):
    """Never abbreviates long options; add_subparsers makes every subparser this class too."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**kwargs, "allow_abbrev": False})


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="accelerator isolation agent")
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
    from agent.runtime.logs import configure_logging  # noqa: PLC0415

    # Library logs go to stderr and only when they matter; stdout is for the command's output
    # (one JSON document with --json). `accelguard agent` reconfigures from its config.
    configure_logging(LoggingConfig(level="warning", format="console"))
    try:
        if _needs_config(args):
            code = int(args.run(args, load_config(args.config, required=True)))
        else:
            code = int(args.run(args))
        # Output still buffered would meet a closed pipe at exit, outside this handler.
        sys.stdout.flush()
    except (AccelguardError, ExceptionGroup) as raised:
        error = _first_accelguard_error(raised)
        if args.debug or error is None:
            raise
        print_error(args, error.exit_code, error_kind(error), str(error))
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        if args.debug or not _stdout_reader_gone():
            raise
        # The rest of the output has nowhere to go; without this, exit would try to flush it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_READER_GONE
    except (RecursionError, MemoryError) as error:
        # Inputs are bounded before they are parsed (agent/runtime/inputs.py), so this is a bound
        # that is missing somewhere: still one line, not a traceback of a thousand frames.
        if args.debug:
            raise
        message = (
            f"input too large or too deeply nested ({type(error).__name__}); --debug shows where"
        )
        print_error(args, ExitCode.FAILED, "input_too_large", message)
        return int(ExitCode.FAILED)
    return code


def _needs_config(args: argparse.Namespace) -> bool:
    if args.command == "config" and args.controller is not None:
        return False  # `config check --controller FILE` checks that file only
    verb = getattr(args, "verb", None)
    return (args.command, None) not in CONFIG_FREE and (args.command, verb) not in CONFIG_FREE


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it: Linux polls that as POLLERR. Any
    other broken pipe (a socket a command wrote to) is a failure to report, not a reader gone."""
    poller = select.poll()
    try:
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


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
