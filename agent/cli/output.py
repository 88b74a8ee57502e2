"""What the CLI prints: one JSON document with ``--json``, else lines of text; progress on stderr.

stdout carries only the command's output (scripts parse it); waiting is shown as one updating
line on stderr, and only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Final

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

PROG: Final = "accelguard"


def message_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def print_json(document: Any) -> None:
    json.dump(document, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def print_error(args: argparse.Namespace, code: int, kind: str, message: str) -> None:
    """A failed command's one line on stderr; with ``--json``, one JSON object instead, so that
    a script that parses the command's output can parse its failure too."""
    if getattr(args, "json", False):
        document = {"error": {"code": code, "kind": kind, "message": message}}
        print(json.dumps(document, sort_keys=True), file=sys.stderr)
    else:
        print(f"{PROG}: error: {message}", file=sys.stderr)


def error_kind(error: BaseException) -> str:
    """A stable short name for the error's class: DaemonUnavailableError is daemon_unavailable."""
    name = type(error).__name__.removesuffix("Error") or type(error).__name__
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def emit(args: argparse.Namespace, message: Message, text: str) -> None:
    """The message as JSON with ``--json``, else ``text``."""
    if args.json:
        print_json(message_dict(message))
    else:
        print(text)


def progress(text: str) -> None:
    """One updating line on a terminal; nothing when stderr is not one (scripts, logs)."""
    if sys.stderr.isatty():
        sys.stderr.write(f"\r{text}\033[K")
        sys.stderr.flush()


def partition_line(p: Any) -> str:
    state = p.state if p.state != "free" else ("free  clean" if p.clean else "free  dirty")
    holder = f"  lease {p.holder}" if p.holder else ""
    reason = f"  ({p.reason})" if p.reason else ""
    return f"{p.uuid}  GPU {p.gpu_index}  {p.profile or 'whole GPU'}  {state}{holder}{reason}"
