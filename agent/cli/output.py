"""What the CLI prints: one JSON document with ``-o json`` (``--json``), else a table with a
header row (``-o table``, the default; ``-o wide`` adds columns); progress on stderr.

stdout carries only the command's output (scripts parse it); waiting is shown as one updating
line on stderr, and only when stderr is a terminal. The JSON contract, the same in every verb:
integers are JSON numbers (protobuf's JSON mapping writes 64-bit ones as strings), times are
RFC 3339 in UTC (``2026-12-02T07:03:10.123Z``) and ``null`` where unset, and a list verb prints an
object holding the list under its resource's plural name (``{"leases": [...]}``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any, Final

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

PROG: Final = "accelguard"

OUTPUT_FORMATS: Final = ("table", "wide", "json")

_INTEGER_TYPES: Final = frozenset({
    FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64,
})  # fmt: skip
_FLOAT_TYPES: Final = frozenset({FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT})
# Seconds-since-the-epoch fields that are not named ``at`` or ``*_at``.
_TIME_FIELDS: Final = frozenset(
    {"last_poll", "last_seen", "not_after", "certificate_not_after", "server_time"}
)


class _OutputFormat(argparse.Action):
    """``-o FORMAT`` and ``--json`` (``const``): sets ``output_format``, and ``json`` for the
    verbs' code to test."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,  # noqa: ARG002 - argparse's signature
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,  # noqa: ARG002
    ) -> None:
        chosen = self.const if self.const is not None else values
        namespace.output_format = chosen
        namespace.json = chosen == "json"


def add_output(parser: argparse.ArgumentParser, *, wide: bool = False) -> None:
    """``-o table|json`` (``wide`` too where the verb has more columns than fit a terminal), and
    ``--json`` for ``-o json``."""
    group = parser.add_mutually_exclusive_group()
    choices = OUTPUT_FORMATS if wide else ("table", "json")
    group.add_argument("-o", "--output", choices=choices, action=_OutputFormat,
                       dest="output_format", help="output format (default table)")  # fmt: skip
    group.add_argument("--json", nargs=0, const="json", action=_OutputFormat,
                       dest="output_format", help="same as -o json")  # fmt: skip
    parser.set_defaults(output_format="table", json=False)


def is_time_field(name: str) -> bool:
    return name == "at" or name.endswith("_at") or name in _TIME_FIELDS


def rfc3339(epoch: float | None) -> str | None:
    """``2026-12-02T07:03:10.123Z``; None for an unset time (0, or None)."""
    if not epoch:
        return None
    moment = datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def message_dict(message: Message) -> dict[str, Any]:
    """The message as our JSON contract has it: every field present, integers as numbers, times
    as RFC 3339 or null."""
    document = MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _contract(message.DESCRIPTOR, document)


def _contract(descriptor: Any, document: dict[str, Any]) -> dict[str, Any]:
    for field in descriptor.fields:
        if field.name not in document:
            continue
        value = document[field.name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            inner = field.message_type.fields_by_name["value"]
            document[field.name] = {k: _value(inner, v, inner.name) for k, v in value.items()}
        elif field.is_repeated:
            document[field.name] = [_value(field, v, field.name) for v in value]
        else:
            document[field.name] = _value(field, value, field.name)
    return document


def _value(field: FieldDescriptor, value: Any, name: str) -> Any:
    if field.message_type is not None:
        if isinstance(value, dict) and field.message_type.full_name.startswith("accelguard."):
            return _contract(field.message_type, value)
        return value  # a well-known type (Struct, Timestamp...) keeps protobuf's own JSON
    if field.type in _INTEGER_TYPES and isinstance(value, str):
        return int(value)
    if field.type in _FLOAT_TYPES and is_time_field(name) and isinstance(value, int | float):
        return rfc3339(float(value))
    return value


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


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, empty: str) -> None:
    """Columns aligned under an upper-case header row, as kubectl prints them; ``empty`` (e.g.
    "no leases") on stderr instead when there are no rows, so that stdout stays parseable."""
    cells = [[_cell(value) for value in row] for row in rows]
    if not cells:
        print(empty, file=sys.stderr)
        return
    table = [[header.upper() for header in headers], *cells]
    widths = [max(len(row[column]) for row in table) for column in range(len(headers))]
    for row in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    return str(value)


def table_time(epoch: float) -> str:
    """A time for a table: RFC 3339 to the second, in UTC; ``-`` when unset."""
    if not epoch:
        return "-"
    return datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def progress(text: str) -> None:
    """One updating line on a terminal; nothing when stderr is not one (scripts, logs)."""
    if sys.stderr.isatty():
        sys.stderr.write(f"\r{text}\033[K")
        sys.stderr.flush()


# A partition's device as operators name it, by partition kind.
_DEVICE_LABELS: Final = {"npu": "NPU", "vnpu": "NPU", "accel": "accel"}


def device_label(kind: str) -> str:
    """``GPU``, ``NPU`` or ``accel`` for a partition kind (gpu, mig, npu, vnpu, accel)."""
    return _DEVICE_LABELS.get(kind, "GPU")


def _profile_text(p: Any) -> str:
    return str(p.profile) if p.profile else f"whole {device_label(p.kind)}"


def partition_line(p: Any) -> str:
    state = p.state if p.state != "free" else ("free  clean" if p.clean else "free  dirty")
    holder = f"  lease {p.holder}" if p.holder else ""
    reason = f"  ({p.reason})" if p.reason else ""
    where = f"{device_label(p.kind)} {p.gpu_index}"
    return f"{p.uuid}  {where}  {_profile_text(p)}  {state}{holder}{reason}"


PARTITION_HEADERS: Final = ("uuid", "gpu", "profile", "state", "clean", "lease", "reason")


def partition_row(p: Any) -> tuple[Any, ...]:
    clean = "yes" if p.clean else "no"
    return (p.uuid, p.gpu_index, _profile_text(p), p.state, clean, p.holder, p.reason)
