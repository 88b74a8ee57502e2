"""``accelguard enroll``: parsing and output.

agent/cli.py adds these with :func:`add_parsers` and runs them with :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from agent.cli.output import add_output

if TYPE_CHECKING:
    from agent.config import Config


def add_parsers(commands: argparse._SubParsersAction[Any]) -> None:
    enroll = commands.add_parser("enroll", help="enroll this node with a controller")
    enroll.add_argument("--controller", required=True, help="the enrollment port, HOST:PORT")
    enroll.add_argument("--token", required=True, help="from `accelguard ctl token create`")
    enroll.add_argument(
        "--ca-fingerprint", required=True,
        help="SHA-256 of the controller CA (printed by `accelguard controller init`)",
    )  # fmt: skip
    enroll.add_argument(
        "--no-tpm", action="store_true",
        help="enroll without TPM evidence (only where the controller allows unattested nodes)",
    )  # fmt: skip
    add_output(enroll)


def run(args: argparse.Namespace, config: Config | None = None) -> int:
    if args.command == "enroll":
        from agent.config import load_config  # noqa: PLC0415
        from agent.link.enrollment import enroll  # noqa: PLC0415

        config = config or load_config(args.config)
        result = enroll(
            config, args.controller, args.token, args.ca_fingerprint, use_tpm=not args.no_tpm
        )
        document = {
            "node_id": result.node_id,
            "spiffe_id": result.spiffe_id,
            "attested": result.attested,
            "certificate_not_after": result.certificate_not_after,
            "cert_dir": str(config.link.cert_dir),
        }
        if args.json:
            json.dump(document, sys.stdout, indent=2, sort_keys=True)
            sys.stdout.write("\n")
        else:
            state = "attested (TPM credential activated)" if result.attested else "unattested"
            print(f"enrolled {result.node_id} as {result.spiffe_id}, {state}")
            print(f"certificate and pinned CA in {config.link.cert_dir}")
        return 0
    raise AssertionError(f"unhandled command {args.command}")  # pragma: no cover
