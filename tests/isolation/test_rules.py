"""Device rule model: parsing and formatting the kernel's devices.list syntax, normalisation."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import IsolationError, ValidationError
from agent.isolation.rules import (
    FULL_ACCESS,
    MAX_MAJOR,
    MAX_MINOR,
    DeviceRule,
    baseline_rules,
    format_rules,
    normalise,
    parse_rule,
    parse_rules,
    rules_for_nodes,
)

accesses = st.frozensets(st.sampled_from("rwm"), min_size=1)
numbers_or_any = st.one_of(st.none(), st.integers(0, MAX_MAJOR))
minors_or_any = st.one_of(st.none(), st.integers(0, MAX_MINOR))
device_rules = st.one_of(
    st.builds(DeviceRule, st.sampled_from(["c", "b"]), numbers_or_any, minors_or_any, accesses),
    st.builds(DeviceRule, st.just("a"), st.none(), st.none(), accesses),
)


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("c 195:0 rwm", DeviceRule("c", 195, 0, FULL_ACCESS)),
        ("c 136:* rwm", DeviceRule("c", 136, None, FULL_ACCESS)),
        ("a *:* rwm", DeviceRule("a", None, None, FULL_ACCESS)),
        ("b 8:0 r", DeviceRule("b", 8, 0, frozenset("r"))),
        ("c *:3 mw", DeviceRule("c", None, 3, frozenset("wm"))),
        ("c 4095:1048575 w\n", DeviceRule("c", MAX_MAJOR, MAX_MINOR, frozenset("w"))),
    ],
)
def test_parse_known_rules(text: str, rule: DeviceRule) -> None:
    assert parse_rule(text) == rule


def test_format_puts_access_in_kernel_order() -> None:
    assert DeviceRule("c", 195, 0, frozenset("mwr")).format() == "c 195:0 rwm"
    assert str(DeviceRule("c", 136, None, frozenset("wr"))) == "c 136:* rw"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "c 195:0",
        "c 195 rwm",
        "x 1:3 rwm",
        "c 1:3 rwx",
        "c 1:3 rr",
        "c 1:3 rwmr",
        "c 4096:0 r",
        "c 1:1048576 r",
        "c -1:3 r",
        "c 1_0:3 r",
        "c \u0661:3 r",  # ARABIC-INDIC DIGIT ONE: int() accepts it, the kernel does not
        "c 1:3  rwm",
        "c  1:3 rwm",
        "a 1:3 rwm",
        "a *:3 rwm",
        "C 1:3 rwm",
        "c 1:3 rwm extra",
        "c 99999999999:3 r",
    ],
)
def test_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(ValidationError):
        parse_rule(text)


def test_parse_rejects_non_text() -> None:
    with pytest.raises(ValidationError, match="must be text"):
        parse_rule(b"c 1:3 rwm")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "major", "minor", "access"),
    [
        ("x", 1, 3, FULL_ACCESS),
        ("c", -1, 3, FULL_ACCESS),
        ("c", 1, MAX_MINOR + 1, FULL_ACCESS),
        ("c", True, 3, FULL_ACCESS),
        ("c", 1, 3, frozenset()),
        ("c", 1, 3, frozenset("rx")),
        ("c", 1, 3, "rwm"),
        ("a", 1, None, FULL_ACCESS),
    ],
)
def test_rule_constructor_validates(
    kind: str, major: object, minor: object, access: object
) -> None:
    with pytest.raises(ValidationError):
        DeviceRule(kind, major, minor, access)  # type: ignore[arg-type]


@settings(max_examples=1000, deadline=None)
@given(device_rules)
def test_format_then_parse_round_trips(rule: DeviceRule) -> None:
    assert parse_rule(rule.format()) == rule


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.sampled_from("abcmrw*:0123456789 \n\t-_\u0661x"), max_size=24))
def test_parse_never_fails_except_with_validation_error(text: str) -> None:
    try:
        rule = parse_rule(text)
    except ValidationError:
        return
    assert parse_rule(rule.format()) == rule


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=40))
def test_parse_arbitrary_text(text: str) -> None:
    with contextlib.suppress(ValidationError):
        parse_rules(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(device_rules, max_size=12))
def test_devices_list_round_trips(rules: list[DeviceRule]) -> None:
    assert parse_rules(format_rules(rules)) == tuple(rules)


def test_parse_rules_names_the_bad_line() -> None:
    with pytest.raises(ValidationError, match="line 2"):
        parse_rules("c 1:3 rwm\nc 1:x rwm\n")


@settings(max_examples=200, deadline=None)
@given(st.lists(device_rules, max_size=12))
def test_normalise_merges_and_is_idempotent(rules: list[DeviceRule]) -> None:
    normalised = normalise(rules)
    assert normalise(normalised) == normalised
    assert normalise(reversed(rules)) == normalised
    keys = [rule.key for rule in normalised]
    assert len(keys) == len(set(keys))
    for rule in rules:
        merged = next(candidate for candidate in normalised if candidate.key == rule.key)
        assert rule.access <= merged.access


def test_normalise_merges_duplicates() -> None:
    rules = [parse_rule("c 195:0 r"), parse_rule("c 195:0 w"), parse_rule("c 1:3 rwm")]
    assert normalise(rules) == (parse_rule("c 1:3 rwm"), parse_rule("c 195:0 rw"))


def test_normalise_keeps_rules_a_wildcard_covers() -> None:
    # The kernel lists both, so a read-back comparison needs both.
    rules = [parse_rule("c 136:* rwm"), parse_rule("c 136:0 rw")]
    assert normalise(rules) == (parse_rule("c 136:* rwm"), parse_rule("c 136:0 rw"))


def test_normalise_rejects_non_rules() -> None:
    with pytest.raises(ValidationError):
        normalise(["c 1:3 rwm"])  # type: ignore[list-item]


def test_baseline_is_runc_default_minus_extras() -> None:
    assert format_rules(baseline_rules()) == (
        "c 1:3 rwm\nc 1:5 rwm\nc 1:7 rwm\nc 1:8 rwm\nc 1:9 rwm\nc 5:0 rwm\nc 5:2 rwm\nc 136:* rwm\n"
    )


def test_rules_for_nodes_reads_device_numbers(sim_dev, tmp_path: Path) -> None:
    block = tmp_path / "block"
    os.mknod(block, 0o600 | stat.S_IFBLK, os.makedev(7, 42))
    rules = rules_for_nodes([sim_dev.nvidia0, sim_dev.nvidiactl, block, sim_dev.nvidia0])
    assert rules == (
        DeviceRule("b", 7, 42, frozenset("rw")),
        DeviceRule("c", sim_dev.gpu_major, 0, frozenset("rw")),
        DeviceRule("c", sim_dev.gpu_major, 255, frozenset("rw")),
    )
    assert rules_for_nodes([sim_dev.uvm], frozenset("r")) == (
        DeviceRule("c", sim_dev.uvm_major, 0, frozenset("r")),
    )


def test_rules_for_nodes_follows_symlinks(sim_dev, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(sim_dev.nvidia1)
    assert rules_for_nodes([link]) == rules_for_nodes([sim_dev.nvidia1])


def test_rules_for_nodes_rejects_non_devices(tmp_path: Path) -> None:
    regular = tmp_path / "file"
    regular.write_text("")
    with pytest.raises(IsolationError, match="not a char or block device"):
        rules_for_nodes([regular])
    with pytest.raises(IsolationError, match="No such file"):
        rules_for_nodes([tmp_path / "missing"])
