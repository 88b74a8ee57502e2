"""Reader for NVIDIA mig-parted configuration files, so operators can reuse the files they have.

The format (github.com/NVIDIA/mig-parted, ``examples/config.yaml``)::

    version: v1
    mig-configs:
      all-3g.40gb:
        - devices: all            # or a list of GPU indices: [0, 1]
          device-filter: ["0x233010DE"]   # optional: PCI device id + vendor id
          mig-enabled: true
          mig-devices:
            "3g.40gb": 2

The file is untrusted input: every defect, whatever it is, comes back as a LayoutError that names
the config it is in and the key path of the defect; nothing else escapes. Every config in the
file is checked, not only the selected one, so a broken file is noticed the first time it is
used rather than the day someone selects the broken config. One thing is forgiven outside the
selected config: a key this reader does not know. Files are shared across a fleet and across
mig-parted versions, and a key added for another config (or by a newer mig-parted) is no reason
to refuse the config that was asked for; in the selected config it is refused, because applying
a layout while ignoring part of it would apply something other than what was written.

:func:`dump_mig_parted` writes the same format (``accelguard layout export``), and what it writes
reads back through :func:`load_mig_parted` as the same entries.

Profile names in mig-devices are kept as written; the planner resolves them against each GPU's
geometry (where "1g.10gb" means a different profile on an A100-40GB than on an H100-80GB).
"""

from __future__ import annotations

import json
import os
import re
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from agent.errors import LayoutError

# mig-parted files are a few kilobytes; the cap keeps a hostile file from costing memory or time.
MAX_FILE_BYTES = 1 << 20
SUPPORTED_VERSION = "v1"

_TOP_LEVEL_KEYS = ("version", "mig-configs")
_ENTRY_KEYS = ("devices", "device-filter", "mig-enabled", "mig-devices")
_REQUIRED_ENTRY_KEYS = ("devices", "mig-enabled")
# A PCI device filter is the 32-bit "device id << 16 | vendor id" NVML reports as pciDeviceId.
_DEVICE_FILTER_PATTERN = re.compile(r"0[xX][0-9a-fA-F]{8}")

_MERGE_TAG = "tag:yaml.org,2002:merge"

# NVML numbers GPUs and counts with unsigned 32-bit integers; YAML integers are unbounded.
_MAX_UINT32 = 2**32 - 1


class _ShortRepr(reprlib.Repr):
    """Bounded repr for error messages; survives integers too long for str() (YAML 0b... ints)."""

    def repr_int(self, x: int, level: int) -> str:
        try:
            return super().repr_int(x, level)
        except ValueError:
            return f"<an integer of {x.bit_length()} bits>"


_short = _ShortRepr()
_short.maxstring = 40
_short.maxother = 40


def _refuse_duplicate_keys(node: yaml.MappingNode) -> None:
    """Refuse a mapping key given twice instead of silently keeping the last one, as PyYAML does.

    A second "mig-configs" or a profile listed twice is an operator's mistake that must not be
    resolved by guessing which one was meant.
    """
    seen: set[tuple[str, str]] = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
            continue
        key = (key_node.tag, key_node.value)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key_node.value!r}",
                key_node.start_mark,
            )
        seen.add(key)


class _PythonLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
        _refuse_duplicate_keys(node)
        return super().construct_mapping(node, deep=deep)


_Loader: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = _PythonLoader


def _libyaml_version() -> tuple[int, ...]:
    version = getattr(getattr(yaml, "_yaml", None), "get_version", None)
    return tuple(version()) if callable(version) else ()


# libyaml is fast and, from 0.2.5 on, refuses nesting deeper than 1000 levels; PyYAML's
# pure-Python scanner needs seconds for a few kilobytes of hostile brackets. With an older
# libyaml, nesting is unbounded and PyYAML's C-level composer recurses once per level, so a
# deep enough file could overflow the C stack: the pure-Python reader (which stops at Python's
# recursion limit) is used instead.
if yaml.__with_libyaml__ and _libyaml_version() >= (0, 2, 5):

    class _LibyamlLoader(yaml.CSafeLoader):
        def construct_mapping(
            self, node: yaml.MappingNode, deep: bool = False
        ) -> dict[object, object]:
            _refuse_duplicate_keys(node)
            return super().construct_mapping(node, deep=deep)

    _Loader = _LibyamlLoader


@dataclass(frozen=True, slots=True)
class MigPartedEntry:
    """One entry of a mig-parted config: which GPUs, and the MIG mode and layout they get."""

    devices: Literal["all"] | tuple[int, ...]
    device_filter: tuple[str, ...]
    mig_enabled: bool
    mig_devices: dict[str, int]


def load_mig_parted(text: str, config_name: str) -> list[MigPartedEntry]:
    """Parse a mig-parted YAML document and return the entries of config ``config_name``."""
    return _load(text, config_name, _Loader)


def _load(
    text: str, config_name: str, loader: type[yaml.SafeLoader] | type[yaml.CSafeLoader]
) -> list[MigPartedEntry]:
    context = f"mig-parted config {_show(config_name)}"
    if not isinstance(config_name, str):
        raise LayoutError(f"{context}: the config name must be a string")
    if not isinstance(text, str):
        raise LayoutError(f"{context}: expected the file's text, got {type(text).__name__}")
    if len(text.encode("utf-8", errors="surrogatepass")) > MAX_FILE_BYTES:
        raise LayoutError(f"{context}: the file is larger than {MAX_FILE_BYTES} bytes")
    try:
        document = yaml.load(text, Loader=loader)  # noqa: S506 (both are safe loaders)
    # PyYAML's constructors raise bare ValueError, KeyError, AttributeError or RecursionError
    # (not only yaml.YAMLError) on hostile input such as "!!bool maybe" or "!!timestamp x".
    except Exception as error:  # noqa: BLE001
        raise LayoutError(f"{context}: the file is not valid YAML: {_one_line(error)}") from None
    return _parse_document(document, config_name, context)


def load_mig_parted_file(path: str | os.PathLike[str], config_name: str) -> list[MigPartedEntry]:
    """Read a mig-parted file from disk and return the entries of config ``config_name``."""
    try:
        with Path(path).open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise LayoutError(
            f"mig-parted config {_show(config_name)}: cannot read {os.fspath(path)!r}: "
            f"{error.strerror or error}"
        ) from None
    if len(data) > MAX_FILE_BYTES:
        raise LayoutError(
            f"mig-parted config {_show(config_name)}: {os.fspath(path)!r} is larger than "
            f"{MAX_FILE_BYTES} bytes"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise LayoutError(
            f"mig-parted config {_show(config_name)}: {os.fspath(path)!r} is not UTF-8 text "
            f"(byte {error.start})"
        ) from None
    return load_mig_parted(text, config_name)


def _parse_document(document: object, config_name: str, context: str) -> list[MigPartedEntry]:
    """Check the whole document and return the entries of ``config_name``."""
    if not isinstance(document, dict):
        raise LayoutError(
            f"{context}: the file must be a mapping with 'version' and 'mig-configs', "
            f"got {_kind(document)}"
        )
    _reject_unknown_keys(document, _TOP_LEVEL_KEYS, "the top level", context)
    version = document.get("version")
    if version != SUPPORTED_VERSION or not isinstance(version, str):
        raise LayoutError(
            f"{context}: version: expected {SUPPORTED_VERSION!r}, got {_show(version)}"
        )
    if "mig-configs" not in document:
        raise LayoutError(f"{context}: mig-configs: missing")
    raw_configs = document["mig-configs"]
    if not isinstance(raw_configs, dict):
        raise LayoutError(
            f"{context}: mig-configs: expected a mapping of config names, got {_kind(raw_configs)}"
        )
    for name in raw_configs:
        if not isinstance(name, str) or not name:
            raise LayoutError(
                f"{context}: mig-configs: config name {_show(name)} is not a non-empty string"
            )
    # The selected config first: when it is broken too, its own defect is the one to report.
    selected = None
    if config_name in raw_configs:
        selected = _parse_config(
            raw_configs[config_name], f"mig-configs.{_key(config_name)}", context, strict=True
        )
    for name, raw_entries in raw_configs.items():
        if name != config_name:
            _parse_config(
                raw_entries,
                f"mig-configs.{_key(name)}",
                f"mig-parted config {_show(name)} (not the selected {_show(config_name)})",
                strict=False,
            )
    if selected is None:
        available = ", ".join(sorted(raw_configs)) or "none"
        raise LayoutError(
            f"{context}: no such config under mig-configs; available configs: {available}"
        )
    return selected


def _parse_config(
    raw_entries: object, path: str, context: str, *, strict: bool
) -> list[MigPartedEntry]:
    if not isinstance(raw_entries, list) or not raw_entries:
        raise LayoutError(
            f"{context}: {path}: expected a non-empty list of entries, got {_kind(raw_entries)}"
        )
    return [
        _parse_entry(raw_entry, f"{path}[{index}]", context, strict=strict)
        for index, raw_entry in enumerate(raw_entries)
    ]


def _parse_entry(raw_entry: object, path: str, context: str, *, strict: bool) -> MigPartedEntry:
    if not isinstance(raw_entry, dict):
        raise LayoutError(f"{context}: {path}: expected a mapping, got {_kind(raw_entry)}")
    if strict:
        _reject_unknown_keys(raw_entry, _ENTRY_KEYS, path, context)
    for key in _REQUIRED_ENTRY_KEYS:
        if key not in raw_entry:
            raise LayoutError(f"{context}: {path}.{key}: missing")

    mig_enabled = raw_entry["mig-enabled"]
    if not isinstance(mig_enabled, bool):
        raise LayoutError(
            f"{context}: {path}.mig-enabled: expected true or false, got {_show(mig_enabled)}"
        )
    mig_devices = _parse_mig_devices(raw_entry.get("mig-devices"), f"{path}.mig-devices", context)
    if not mig_enabled and any(mig_devices.values()):
        raise LayoutError(
            f"{context}: {path}.mig-devices: MIG instances are listed but mig-enabled is false"
        )
    return MigPartedEntry(
        devices=_parse_devices(raw_entry["devices"], f"{path}.devices", context),
        device_filter=_parse_device_filter(
            raw_entry.get("device-filter"), "device-filter" in raw_entry, path, context
        ),
        mig_enabled=mig_enabled,
        mig_devices=mig_devices,
    )


def _parse_devices(raw: object, path: str, context: str) -> Literal["all"] | tuple[int, ...]:
    if raw == "all" and isinstance(raw, str):
        return "all"
    if not isinstance(raw, list) or not raw:
        raise LayoutError(
            f"{context}: {path}: expected 'all' or a non-empty list of GPU indices, "
            f"got {_show(raw)}"
        )
    indices: list[int] = []
    for position, index in enumerate(raw):
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= _MAX_UINT32:
            raise LayoutError(
                f"{context}: {path}[{position}]: expected a GPU index (integer >= 0), "
                f"got {_show(index)}"
            )
        if index in indices:
            raise LayoutError(f"{context}: {path}[{position}]: GPU index {index} is listed twice")
        indices.append(index)
    return tuple(indices)


def _parse_device_filter(
    raw: object, present: bool, entry_path: str, context: str
) -> tuple[str, ...]:
    path = f"{entry_path}.device-filter"
    if not present:
        return ()
    single = not isinstance(raw, list)
    raw_filters = [raw] if single else raw
    if not isinstance(raw_filters, list) or not raw_filters:
        raise LayoutError(
            f"{context}: {path}: expected a PCI device id such as '0x233010DE' or a non-empty "
            f"list of them, got {_show(raw)}"
        )
    filters: list[str] = []
    for position, device_id in enumerate(raw_filters):
        where = path if single else f"{path}[{position}]"
        if isinstance(device_id, int) and not isinstance(device_id, bool):
            raise LayoutError(
                f"{context}: {where}: got the number {_show(device_id)}; quote the PCI device id "
                "(YAML reads an unquoted 0x20B010DE as a number)"
            )
        if not isinstance(device_id, str) or not _DEVICE_FILTER_PATTERN.fullmatch(device_id):
            raise LayoutError(
                f"{context}: {where}: expected a PCI device id such as '0x233010DE' "
                f"(device id and vendor id, 8 hex digits), got {_show(device_id)}"
            )
        canonical = "0x" + device_id[2:].upper()
        if canonical in filters:
            raise LayoutError(f"{context}: {where}: {device_id!r} is listed twice")
        filters.append(canonical)
    return tuple(filters)


def _parse_mig_devices(raw: object, path: str, context: str) -> dict[str, int]:
    # mig-parted decodes a missing or null mig-devices as "no instances" (a nil Go map).
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise LayoutError(
            f"{context}: {path}: expected a mapping of MIG profile names to counts, "
            f"got {_kind(raw)}"
        )
    counts: dict[str, int] = {}
    for name, count in raw.items():
        if not isinstance(name, str) or not name.strip():
            raise LayoutError(
                f"{context}: {path}: profile name {_show(name)} is not a non-empty string"
            )
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= _MAX_UINT32:
            raise LayoutError(
                f"{context}: {path}.{_key(name)}: expected a count (integer >= 0), "
                f"got {_show(count)}"
            )
        counts[name] = count
    return counts


def _reject_unknown_keys(
    mapping: Mapping[object, object], allowed: tuple[str, ...], where: str, context: str
) -> None:
    for key in mapping:
        if key not in allowed or not isinstance(key, str):
            raise LayoutError(
                f"{context}: {where}: unknown key {_show(key)}; allowed keys: {', '.join(allowed)}"
            )


def dump_mig_parted(config_name: str, entries: Sequence[MigPartedEntry]) -> str:
    """A mig-parted file with one config, ``config_name``, made of ``entries``.

    Strings are written quoted, so a profile name such as "1g.10gb" or a config name with odd
    characters comes back unchanged; a name that would not (checked by reading the text back)
    is refused.
    """
    if not config_name:
        raise LayoutError("a mig-parted config name must be a non-empty string")
    if not entries:
        raise LayoutError(f"mig-parted config {_show(config_name)}: no entries to write")
    lines = [f"version: {SUPPORTED_VERSION}", "mig-configs:", f"  {_quoted(config_name)}:"]
    for entry in entries:
        devices = (
            "all" if entry.devices == "all" else "[" + ", ".join(map(str, entry.devices)) + "]"
        )
        lines.append(f"    - devices: {devices}")
        if entry.device_filter:
            lines.append(
                "      device-filter: [" + ", ".join(map(_quoted, entry.device_filter)) + "]"
            )
        lines.append(f"      mig-enabled: {'true' if entry.mig_enabled else 'false'}")
        if entry.mig_devices:
            lines.append("      mig-devices:")
            lines += [
                f"        {_quoted(name)}: {count}"
                for name, count in sorted(entry.mig_devices.items())
            ]
        else:
            lines.append("      mig-devices: {}")
    text = "\n".join(lines) + "\n"
    # A name YAML would read differently (a lone surrogate, a line separator) is refused here
    # rather than discovered when the file is applied.
    try:
        reads_back = load_mig_parted(text, config_name) == list(entries)
    except LayoutError:
        reads_back = False
    if not reads_back:
        raise LayoutError(
            f"mig-parted config {_show(config_name)}: YAML would not read this config back as "
            "written; use a plainer config name"
        )
    return text


def _quoted(text: str) -> str:
    # A JSON string is a YAML double-quoted scalar with the same value.
    return json.dumps(text, ensure_ascii=False)


def _show(value: object) -> str:
    return _short.repr(value)


def _key(name: str) -> str:
    """A mapping key as it appears in a key path: as written, unless it needs quoting."""
    if len(name) <= 60 and name.isprintable() and not set(name) & set(" []'\"\\"):
        return name
    return _show(name)


def _kind(value: object) -> str:
    return f"{type(value).__name__} {_show(value)}"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__
