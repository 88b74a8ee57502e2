"""The CLI layout syntax: ``3g.40gb=2`` items, comma-separated or not."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import LayoutError
from agent.hw.mig.planner import parse_layout_spec, plan_layout
from agent.hw.mig.profiles import H100_80GB


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ([], {}),
        (["3g.40gb=2"], {"3g.40gb": 2}),
        (["3g.40gb=1", "2g.20gb=1"], {"3g.40gb": 1, "2g.20gb": 1}),
        (["3g.40gb=1,2g.20gb=1"], {"3g.40gb": 1, "2g.20gb": 1}),
        ([" 3g.40gb = 1 , 1g.10gb=0 "], {"3g.40gb": 1, "1g.10gb": 0}),
        (["MIG 1g.10gb+me=1"], {"MIG 1g.10gb+me": 1}),
        (["9=1", "0007g.80gb=000"], {"9": 1, "0007g.80gb": 0}),
        (["1g.10gb=999999"], {"1g.10gb": 999999}),
    ],
)
def test_good_items_parse(items: list[str], expected: dict[str, int]) -> None:
    assert parse_layout_spec(items) == expected


@pytest.mark.parametrize(
    ("items", "offending", "reason"),
    [
        (["3g.40gb"], "3g.40gb", "is not PROFILE=COUNT"),
        (["3g.40gb=x"], "3g.40gb=x", "count 'x'"),
        (["3g.40gb=-1"], "3g.40gb=-1", "count '-1'"),
        (["3g.40gb=+1"], "3g.40gb=+1", "count '+1'"),
        (["3g.40gb=1.0"], "3g.40gb=1.0", "count '1.0'"),
        (["3g.40gb=1e3"], "3g.40gb=1e3", "count '1e3'"),
        (["3g.40gb=\u0663"], "3g.40gb=\u0663", "not a non-negative integer"),  # Arabic-Indic 3
        (["3g.40gb="], "3g.40gb=", "count ''"),
        (["3g.40gb=1=2"], "3g.40gb=1=2", "count '1=2'"),
        (["3g.40gb=1234567"], "3g.40gb=1234567", "at most 6 digits"),
        (["3g.40gb=" + "9" * 5000], "3g.40gb=", "not a non-negative integer"),
        (["=1"], "=1", "the profile name is empty"),
        (["  =1"], "  =1", "the profile name is empty"),
        (["3g.40gb=1,"], "3g.40gb=1,", "is not PROFILE=COUNT"),
        ([""], "", "is not PROFILE=COUNT"),
        (["3g.40gb=1", "3g.40gb=2"], "3g.40gb=2", "3g.40gb is given twice"),
        (["3g.40gb=1,3g.40gb=1"], "3g.40gb=1,3g.40gb=1", "3g.40gb is given twice"),
        (["a\x00b=1"], "a\\x00b=1", "has unprintable characters"),
    ],
)
def test_bad_items_are_quoted_in_the_error(items: list[str], offending: str, reason: str) -> None:
    with pytest.raises(LayoutError) as raised:
        parse_layout_spec(items)
    message = str(raised.value)
    assert offending in message
    assert reason in message


def test_a_non_string_item_is_refused() -> None:
    with pytest.raises(LayoutError, match=re.escape("invalid MIG layout item 3")):
        parse_layout_spec([3])  # type: ignore[list-item]


def test_parsed_specs_feed_the_planner() -> None:
    counts = parse_layout_spec(["MIG 3g.40gb=1", "2g.20gb=1,1g.10gb=2"])
    plan = plan_layout(H100_80GB, counts, [])
    assert sorted(p.profile_id for p in plan.create) == [9, 14, 19, 19]


profile_names = (
    st.text(alphabet="0123456789abcgmeMIG.+-_ ", min_size=1, max_size=16)
    .map(str.strip)
    .filter(bool)
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(profile_names, st.integers(min_value=0, max_value=999999), max_size=8))
def test_formatting_and_parsing_round_trip(counts: dict[str, int]) -> None:
    items = [f"{name}={count}" for name, count in counts.items()]
    assert parse_layout_spec(items) == counts
    assert parse_layout_spec([",".join(items)] if items else []) == counts


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=4))
def test_any_text_parses_or_raises_layout_error(items: list[str]) -> None:
    try:
        counts = parse_layout_spec(items)
    except LayoutError as error:
        message = str(error)
        assert message.startswith("invalid MIG layout item ")
        return
    for name, count in counts.items():
        assert name
        assert name == name.strip()
        assert isinstance(count, int)
        assert 0 <= count <= 999999


@settings(max_examples=1500, deadline=None)
@given(st.text(alphabet="3g.40bm=,1 2-+x", max_size=30))
def test_spec_shaped_text_parses_or_raises_layout_error(item: str) -> None:
    try:
        counts = parse_layout_spec([item])
    except LayoutError as error:
        assert repr(item) in str(error)
        return
    assert sum(part.count("=") for part in item.split(",")) == len(counts)
