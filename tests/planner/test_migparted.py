"""Reading NVIDIA mig-parted config files: good files, every kind of bad one, and fuzzing."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import LayoutError
from agent.hw.mig import parted as migparted
from agent.hw.mig.parted import (
    MAX_FILE_BYTES,
    MigPartedEntry,
    load_mig_parted,
    load_mig_parted_file,
)
from agent.hw.mig.planner import plan_layout
from agent.hw.mig.profiles import REFERENCE_GEOMETRIES

EXAMPLE = Path(__file__).parent / "data" / "mig-parted-config.yaml"
EXAMPLE_TEXT = EXAMPLE.read_text(encoding="utf-8")
EXAMPLE_CONFIGS = sorted(yaml.safe_load(EXAMPLE_TEXT)["mig-configs"])

# pciDeviceId as NVML reports it (device id << 16 | 0x10DE) -> the GPU it identifies.
MODEL_BY_DEVICE_ID = {
    "0x233010DE": "H100-80GB",
    "0x233110DE": "H100-80GB",
    "0x20B010DE": "A100-40GB",
    "0x20B210DE": "A100-80GB",
    "0x20B510DE": "A100-80GB",
}


def test_the_example_file_reads_as_written() -> None:
    assert load_mig_parted_file(EXAMPLE, "all-disabled") == [
        MigPartedEntry(devices="all", device_filter=(), mig_enabled=False, mig_devices={})
    ]
    assert load_mig_parted_file(str(EXAMPLE), "all-enabled") == [
        MigPartedEntry(devices="all", device_filter=(), mig_enabled=True, mig_devices={})
    ]
    balanced = load_mig_parted(EXAMPLE_TEXT, "all-balanced")
    assert balanced[0] == MigPartedEntry(
        devices="all",
        device_filter=("0x20B010DE",),
        mig_enabled=True,
        mig_devices={"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1},
    )
    assert balanced[1].device_filter == ("0x233010DE", "0x233110DE", "0x20B210DE", "0x20B510DE")
    custom = load_mig_parted(EXAMPLE_TEXT, "custom-config")
    assert [entry.devices for entry in custom] == [(0, 1, 2, 3), (4, 5), (6, 7)]
    assert [entry.mig_enabled for entry in custom] == [False, True, True]
    assert custom[2].mig_devices == {"1g.10gb+me": 1, "1g.10gb": 6}


@pytest.mark.parametrize("config", EXAMPLE_CONFIGS)
def test_every_example_config_plans_on_the_gpus_it_targets(config: str) -> None:
    for entry in load_mig_parted(EXAMPLE_TEXT, config):
        models = (
            {MODEL_BY_DEVICE_ID[device_id] for device_id in entry.device_filter}
            if entry.device_filter
            else set(REFERENCE_GEOMETRIES)
        )
        if entry.devices != "all" and "1g.10gb" in entry.mig_devices:
            models.discard("A100-40GB")  # custom-config names 80 GB profiles for GPUs 6-7
        if entry.devices != "all" and "3g.40gb" in entry.mig_devices:
            models.discard("A100-40GB")
        for model in models:
            plan = plan_layout(REFERENCE_GEOMETRIES[model], entry.mig_devices, [])
            assert len(plan.create) == sum(entry.mig_devices.values())


def test_device_filters_are_normalised() -> None:
    text = """
version: v1
mig-configs:
  c:
    - devices: all
      device-filter: ["0x20b010de", "0X233010dE"]
      mig-enabled: false
"""
    (entry,) = load_mig_parted(text, "c")
    assert entry.device_filter == ("0x20B010DE", "0x233010DE")


def test_missing_or_null_mig_devices_mean_no_instances() -> None:
    text = """
version: v1
mig-configs:
  c:
    - {devices: [0], mig-enabled: true}
    - {devices: [1], mig-enabled: true, mig-devices: null}
    - {devices: [2], mig-enabled: false, mig-devices: {}}
    - {devices: [3], mig-enabled: false, mig-devices: {"1g.10gb": 0}}
"""
    entries = load_mig_parted(text, "c")
    assert [entry.mig_devices for entry in entries] == [{}, {}, {}, {"1g.10gb": 0}]


def test_yaml_anchors_and_merge_keys_work() -> None:
    text = """
version: v1
mig-configs:
  a: &base
    - devices: all
      mig-enabled: true
      mig-devices: &layout {"3g.40gb": 2}
  b: *base
  c:
    - devices: [0]
      mig-enabled: true
      mig-devices:
        <<: *layout
        "3g.40gb": 1
"""
    assert load_mig_parted(text, "b") == load_mig_parted(text, "a")
    assert load_mig_parted(text, "c")[0].mig_devices == {"3g.40gb": 1}


def entry_text(**fields: str) -> str:
    lines = "\n".join(f"      {key}: {value}" for key, value in fields.items())
    return f"version: v1\nmig-configs:\n  c:\n    - {lines.lstrip()}\n"


GOOD_ENTRY = {"devices": "all", "mig-enabled": "true", "mig-devices": '{"3g.40gb": 2}'}


def with_entry(**changes: str | None) -> str:
    fields = {**GOOD_ENTRY, **changes}
    return entry_text(**{key: value for key, value in fields.items() if value is not None})


BAD_FILES = [
    ("", "the file must be a mapping", ""),
    ("version: v1\nmig-configs: {a: [\n", "not valid YAML", ""),
    ("\tversion: v1", "not valid YAML", ""),
    ("- version: v1", "the file must be a mapping", ""),
    ("just text", "the file must be a mapping", ""),
    ("mig-configs: {}", "version: expected 'v1', got None", ""),
    ("version: v2\nmig-configs: {}", "version: expected 'v1', got 'v2'", ""),
    ("version: 1\nmig-configs: {}", "version: expected 'v1', got 1", ""),
    ("version: v1", "mig-configs: missing", ""),
    ("version: v1\nmig-configs: []", "mig-configs: expected a mapping", ""),
    ("version: v1\nmig-configs: {}\nextra: 1", "unknown key 'extra'", "the top level"),
    ("version: v1\nmig-configs: {}\n1: 1", "unknown key 1", "the top level"),
    ("version: v1\nmig-configs: {}", "no such config", "available configs: none"),
    ("version: v1\nmig-configs: {1: []}", "config name 1 is not a non-empty string", ""),
    ("version: v1\nmig-configs: {c: {}}", "expected a non-empty list", "mig-configs.c"),
    ("version: v1\nmig-configs: {c: []}", "expected a non-empty list", "mig-configs.c"),
    ("version: v1\nmig-configs: {c: [all]}", "expected a mapping", "mig-configs.c[0]"),
    ("version: v1\nmig-configs:\n  c: []\n  c: []", "duplicate key 'c'", ""),
    ("version: v1\nversion: v1\nmig-configs: {}", "duplicate key 'version'", ""),
    (with_entry(devices=None), "missing", "mig-configs.c[0].devices"),
    (with_entry(**{"mig-enabled": None}), "missing", "mig-configs.c[0].mig-enabled"),
    (with_entry(colour="red"), "unknown key 'colour'", "mig-configs.c[0]"),
    (with_entry(devices="some"), "expected 'all' or a non-empty list", ".devices"),
    (with_entry(devices="ALL"), "expected 'all' or a non-empty list", ".devices"),
    (with_entry(devices="0"), "expected 'all' or a non-empty list", ".devices"),
    (with_entry(devices="[]"), "expected 'all' or a non-empty list", ".devices"),
    (with_entry(devices="[0, 1, 0]"), "GPU index 0 is listed twice", ".devices[2]"),
    (with_entry(devices="[-1]"), "expected a GPU index", ".devices[0]"),
    (with_entry(devices="[true]"), "expected a GPU index", ".devices[0]"),
    (with_entry(devices="['0']"), "expected a GPU index", ".devices[0]"),
    (with_entry(devices="[1.0]"), "expected a GPU index", ".devices[0]"),
    (with_entry(devices="[4294967296]"), "expected a GPU index", ".devices[0]"),
    (with_entry(**{"device-filter": "123"}), "quote the PCI device id", ".device-filter"),
    (with_entry(**{"device-filter": "0x20B010DE"}), "quote the PCI device id", ".device-filter"),
    (with_entry(**{"device-filter": "'20B010DE'"}), "expected a PCI device id", ".device-filter"),
    (with_entry(**{"device-filter": "'0x20B010D'"}), "expected a PCI device id", ".device-filter"),
    (with_entry(**{"device-filter": "[]"}), "non-empty list", ".device-filter"),
    (with_entry(**{"device-filter": ""}), "expected a PCI device id", ".device-filter"),
    (with_entry(**{"device-filter": "{a: 1}"}), "expected a PCI device id", ".device-filter"),
    (
        with_entry(**{"device-filter": "['0x20B010DE', '0x20b010de']"}),
        "is listed twice",
        ".device-filter[1]",
    ),
    (with_entry(**{"device-filter": "[true]"}), "expected a PCI device id", "device-filter[0]"),
    (with_entry(**{"mig-enabled": "'yes'"}), "expected true or false", ".mig-enabled"),
    (with_entry(**{"mig-enabled": "1"}), "expected true or false", ".mig-enabled"),
    (with_entry(**{"mig-enabled": ""}), "expected true or false", ".mig-enabled"),
    (with_entry(**{"mig-devices": "[3g.40gb]"}), "expected a mapping", ".mig-devices"),
    (with_entry(**{"mig-devices": "3g.40gb"}), "expected a mapping", ".mig-devices"),
    (with_entry(**{"mig-devices": '{"3g.40gb": -1}'}), "expected a count", ".mig-devices.3g"),
    (with_entry(**{"mig-devices": '{"3g.40gb": true}'}), "got True", "mig-devices.3g.40gb"),
    (with_entry(**{"mig-devices": '{"3g.40gb": "2"}'}), "got '2'", "mig-devices.3g.40gb"),
    (with_entry(**{"mig-devices": '{"3g.40gb": 1.5}'}), "got 1.5", "mig-devices.3g.40gb"),
    (with_entry(**{"mig-devices": '{"3g.40gb": }'}), "got None", "mig-devices.3g.40gb"),
    (with_entry(**{"mig-devices": "{3g.40gb: 0b" + "1" * 20000 + "}"}), "bits>", ".mig-devices"),
    (with_entry(**{"mig-devices": "{7: 1}"}), "profile name 7 is not", ".mig-devices"),
    (with_entry(**{"mig-devices": "{'': 1}"}), "profile name '' is not", ".mig-devices"),
    (with_entry(**{"mig-devices": "{a: 1, a: 2}"}), "duplicate key 'a'", ""),
    (
        with_entry(**{"mig-enabled": "false"}),
        "MIG instances are listed but mig-enabled is false",
        ".mig-devices",
    ),
    # PyYAML's constructors raise builtin errors on these; they must come out as LayoutError.
    ("!!bool maybe", "not valid YAML", ""),
    ("!!timestamp x", "not valid YAML", ""),
    ("!!int x", "not valid YAML", ""),
    ("!!float x", "not valid YAML", ""),
    ("!!binary ???", "the file must be a mapping", "got bytes"),
    ("!!binary 'a'", "not valid YAML", ""),
    ("!!python/object/apply:os.system ['true']", "not valid YAML", ""),
    ("a: 2001-02-30", "not valid YAML", ""),
    ("a: 1" + "0" * 5000, "not valid YAML", ""),
    ("[" * 1100, "not valid YAML", ""),
    ("[" * 1100 + "]" * 1100, "not valid YAML", ""),
    ("&a [*a]", "the file must be a mapping", ""),
    ("version: v1\nmig-configs: {c: &a [*a]}", "expected a mapping, got list", "c[0]"),
    (
        "version: v1\nmig-configs: {c: [{devices: &a [*a], mig-enabled: true}]}",
        "expected a GPU index",
        "devices[0]",
    ),
    ("version: v1\nmig-configs: &a {c: *a}", "expected a non-empty list", "mig-configs.c"),
]


# The module reads YAML with libyaml where PyYAML has a recent one, else with PyYAML's own
# pure-Python reader; both must give the same answers, so the table runs through each.
YAML_LOADERS = sorted({migparted._Loader, migparted._PythonLoader}, key=lambda c: c.__name__)


@pytest.mark.parametrize("loader", YAML_LOADERS, ids=lambda loader: loader.__name__)
@pytest.mark.parametrize(
    ("text", "reason", "where"), BAD_FILES, ids=[f"bad-file-{i}" for i in range(len(BAD_FILES))]
)
def test_bad_files_say_what_and_where(text: str, reason: str, where: str, loader: Any) -> None:
    with pytest.raises(LayoutError) as raised:
        migparted._load(text, "c", loader)
    message = str(raised.value)
    assert message.startswith("mig-parted config 'c': ")
    assert reason in message
    assert where in message
    assert len(message) < 1000


def test_an_unknown_config_lists_the_available_ones() -> None:
    with pytest.raises(LayoutError) as raised:
        load_mig_parted(EXAMPLE_TEXT, "all-4g.40gb")
    message = str(raised.value)
    assert "'all-4g.40gb'" in message
    assert "available configs: " + ", ".join(EXAMPLE_CONFIGS) in message


def test_an_error_in_another_config_still_fails_the_file() -> None:
    text = EXAMPLE_TEXT + "\n  broken:\n    - devices: [0]\n"
    with pytest.raises(LayoutError, match=re.escape("mig-configs.broken[0].mig-enabled: missing")):
        load_mig_parted(text, "all-disabled")


def test_odd_config_names_are_quoted_in_key_paths() -> None:
    text = 'version: v1\nmig-configs:\n  "my config": [{devices: all}]\n'
    with pytest.raises(LayoutError, match=re.escape("mig-configs.'my config'[0].mig-enabled")):
        load_mig_parted(text, "my config")


def test_non_text_arguments_are_refused() -> None:
    with pytest.raises(LayoutError, match="expected the file's text"):
        load_mig_parted(b"version: v1", "c")  # type: ignore[arg-type]
    with pytest.raises(LayoutError, match="config name must be a string"):
        load_mig_parted("version: v1\nmig-configs: {}", ["c"])  # type: ignore[arg-type]


def test_oversized_text_is_refused() -> None:
    with pytest.raises(LayoutError, match="larger than"):
        load_mig_parted("#" * (MAX_FILE_BYTES + 1), "c")


def test_file_errors_become_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="cannot read"):
        load_mig_parted_file(tmp_path / "missing.yaml", "c")
    with pytest.raises(LayoutError, match="cannot read"):
        load_mig_parted_file(tmp_path, "c")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"version: v1\n# caf\xe9\n")
    with pytest.raises(LayoutError, match=r"not UTF-8 text \(byte 17\)"):
        load_mig_parted_file(latin1, "c")
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (MAX_FILE_BYTES + 1))
    with pytest.raises(LayoutError, match="larger than"):
        load_mig_parted_file(big, "c")
    good = tmp_path / "good.yaml"
    good.write_text(EXAMPLE_TEXT, encoding="utf-8")
    assert load_mig_parted_file(os.fspath(good), "all-3g.40gb")[0].mig_devices == {"3g.40gb": 2}


# --- fuzzing ----------------------------------------------------------------------------------


def check_outcome(
    text: str, config: str, loader: Any = migparted._Loader
) -> list[MigPartedEntry] | None:
    """The only outcomes allowed on any input: well-typed entries, or a LayoutError."""
    try:
        entries = migparted._load(text, config, loader)
    except LayoutError as error:
        message = str(error)
        assert message.startswith("mig-parted config ")
        assert len(message) < 2000
        return None
    assert entries
    for entry in entries:
        assert entry.devices == "all" or (
            isinstance(entry.devices, tuple)
            and len(set(entry.devices)) == len(entry.devices)
            and all(type(index) is int and index >= 0 for index in entry.devices)
        )
        assert all(re.fullmatch(r"0x[0-9A-F]{8}", device) for device in entry.device_filter)
        assert type(entry.mig_enabled) is bool
        assert entry.mig_enabled or not any(entry.mig_devices.values())
        for name, count in entry.mig_devices.items():
            assert isinstance(name, str)
            assert name.strip()
            assert type(count) is int
            assert count >= 0
        repr(entry)
    return entries


@settings(max_examples=2000, deadline=None)
@given(st.text(max_size=300), st.sampled_from(["c", "all-disabled"]))
def test_any_text_is_entries_or_layout_error(text: str, config: str) -> None:
    check_outcome(text, config)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=" \t\n:-[]{},\"'&*!#|>?%@`abcv1", max_size=200))
def test_yaml_syntax_soup_reads_the_same_with_either_loader(text: str) -> None:
    outcomes = set()
    for loader in YAML_LOADERS:
        entries = check_outcome(text, "c", loader)
        outcomes.add(None if entries is None else repr(entries))
    # Both readers may refuse a text for different reasons, but never accept it differently.
    assert len(outcomes) == 1 or None in outcomes


yaml_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.sampled_from(["all", "v1", "c", "0x20B010DE", "3g.40gb", "mig-enabled", "devices"])
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(
        yaml_scalars.filter(lambda key: not (isinstance(key, float) and math.isnan(key))),
        children,
        max_size=4,
    ),
    max_leaves=8,
)


def dump(document: Any) -> str:
    # libyaml's emitter when PyYAML has it: the pure-Python one would dominate the fuzzing time.
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump(document, Dumper=dumper)


@settings(max_examples=600, deadline=None)
@given(yaml_values)
def test_any_yaml_document_is_entries_or_layout_error(document: Any) -> None:
    check_outcome(dump(document), "c")


# Near-valid documents from a grammar: each field is mostly valid, else wrong in one of the ways
# an operator (or an attacker) might write it, so that both acceptance and each refusal happen
# often. sampled_from keeps each draw cheap, so many examples fit in the time.
GOOD_DEVICES = ["all", [0], [0, 1], [3, 1]]
BAD_DEVICES = [[0, 1, 0], [-1], [True], [0.5], ["0"], [], "ALL", 0, None]
GOOD_FILTERS = ["0x20B010DE", "0x233010de", ["0x233010DE", "0x20B210DE"]]
BAD_FILTERS = [["0x2330"], [], 548409566, None, ["0x233010DE", "0x233010de"]]
GOOD_MIG_DEVICES = [{}, None, {"3g.40gb": 2}, {"1g.10gb": 7, "1g.10gb+me": 0}]
BAD_MIG_DEVICES = [
    {"3g.40gb": -1},
    {"3g.40gb": True},
    {"3g.40gb": "2"},
    {"3g.40gb": 2.0},
    {"": 1},
    {7: 1},
    ["3g.40gb"],
    "3g.40gb=2",
]


def mostly(good: list[Any], bad: list[Any]) -> st.SearchStrategy[Any]:
    return st.sampled_from(good * (3 * len(bad)) + bad * len(good))


@st.composite
def near_valid_entries(draw: st.DrawFn) -> dict[str, Any]:
    entry = {
        "devices": draw(mostly(GOOD_DEVICES, BAD_DEVICES)),
        "mig-enabled": draw(mostly([True, False], ["true", 1, None])),
    }
    if draw(st.booleans()):
        entry["device-filter"] = draw(mostly(GOOD_FILTERS, BAD_FILTERS))
    if draw(st.booleans()):
        entry["mig-devices"] = draw(mostly(GOOD_MIG_DEVICES, BAD_MIG_DEVICES))
    damage = draw(st.sampled_from(["none"] * 12 + ["devices", "mig-enabled", "extra key"]))
    if damage == "extra key":
        entry["colour"] = "red"
    else:
        entry.pop(damage, None)
    return entry


near_valid_documents = st.fixed_dictionaries(
    {
        "version": mostly(["v1"], ["v2", 1, None]),
        "mig-configs": st.fixed_dictionaries(
            {"c": st.lists(near_valid_entries(), min_size=1, max_size=3)},
            optional={"x": st.lists(near_valid_entries(), min_size=1, max_size=1)},
        ),
    }
)


@settings(max_examples=700, deadline=None)
@given(near_valid_documents)
def test_near_valid_documents_are_entries_or_layout_error(document: dict[str, Any]) -> None:
    entries = check_outcome(dump(document), "c")
    if entries is None:
        return
    # Whatever was accepted reads back exactly as written.
    for raw, entry in zip(document["mig-configs"]["c"], entries, strict=True):
        assert entry.devices == (
            raw["devices"] if raw["devices"] == "all" else tuple(raw["devices"])
        )
        assert entry.mig_enabled is raw["mig-enabled"]
        assert entry.mig_devices == (raw.get("mig-devices") or {})
        written = raw.get("device-filter", [])
        written = [written] if isinstance(written, str) else written
        assert entry.device_filter == tuple("0x" + device[2:].upper() for device in written)


SMALL_EXAMPLE = """version: v1
mig-configs:
  c:
    - device-filter: ["0x233010DE"]
      devices: [0, 1]
      mig-enabled: true
      mig-devices:
        "3g.40gb": 1
        "2g.20gb": 2
    - devices: all
      mig-enabled: false
  d: [{devices: all, mig-enabled: true, mig-devices: {}}]
"""


@settings(max_examples=600, deadline=None)
@given(st.data())
def test_damaged_config_files_are_entries_or_layout_error(data: st.DataObject) -> None:
    # Small on purpose: PyYAML's pure-Python parser takes milliseconds per kilobyte.
    text = SMALL_EXAMPLE
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        position = data.draw(st.integers(min_value=0, max_value=len(text)))
        cut = data.draw(st.integers(min_value=0, max_value=8))
        insert = data.draw(st.text(alphabet=" \t\n:-[]{},\"'&*!#0x1", max_size=3))
        text = text[:position] + insert + text[position + cut :]
    check_outcome(text, data.draw(st.sampled_from(["c", "d"])))


def test_nan_and_infinite_counts_are_refused() -> None:
    for value in (".nan", ".inf", "-.inf"):
        with pytest.raises(LayoutError, match="expected a count"):
            load_mig_parted(with_entry(**{"mig-devices": f"{{a: {value}}}"}), "c")
    assert math.isnan(yaml.safe_load(".nan"))
