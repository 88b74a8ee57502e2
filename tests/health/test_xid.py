"""XID classification (agent/health/xid.py) against NVIDIA's Xid Catalog, written out here by hand
from the Catalog (docs.nvidia.com/deploy/xid-errors/analyzing-xid-catalog.html) and from the
Kubernetes device plugin's source, not from the table under test."""

from __future__ import annotations

import re
import tomllib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import ValidationError
from agent.health import xid as xid_module
from agent.health.xid import (
    BUCKET_RESPONSES,
    CATALOG,
    MAX_XID,
    Action,
    Bucket,
    CatalogEntry,
    Source,
    classify,
    parse_overrides,
)

QUARANTINES = {Action.QUARANTINE_GPU, Action.QUARANTINE_INSTANCE}


@pytest.mark.parametrize("has_instance", [False, True])
@pytest.mark.parametrize(
    ("xid", "mnemonic"),
    [
        (13, "ROBUST_CHANNEL_GR_EXCEPTION / ROBUST_CHANNEL_GR_ERROR_SW_NOTIFY"),
        (31, "ROBUST_CHANNEL_FIFO_ERROR_MMU_ERR_FLT"),
        (68, "ROBUST_CHANNEL_NVDEC0_ERROR"),
    ],
)
def test_application_faults_are_lease_events(xid: int, mnemonic: str, has_instance: bool) -> None:
    result = classify(xid, has_instance)
    assert result.action is Action.LEASE_EVENT
    assert (result.catalog_action, result.mnemonic) == ("RESTART_APP", mnemonic)
    assert (result.reset_required, result.source) == (False, Source.CATALOG)


@pytest.mark.parametrize("has_instance", [False, True])
def test_43_is_ignored_as_the_catalog_says(has_instance: bool) -> None:
    # The Catalog's immediate action for 43 is IGNORE, not RESTART_APP: "The GPU remains in a
    # healthy state." An operator who wants it on the lease overrides it (below).
    result = classify(43, has_instance)
    assert (result.action, result.catalog_action) == (Action.IGNORE, "IGNORE")
    assert not result.reset_required


@pytest.mark.parametrize("has_instance", [False, True])
@pytest.mark.parametrize(
    ("xid", "catalog_action"),
    [
        (48, "WORKFLOW_XID_48"),  # double-bit ECC
        (79, "RESTART_BM"),  # fell off the bus
        (95, "RESET_GPU"),  # uncontained memory error
        (109, "RESET_GPU"),  # context switch timeout
        (119, "RESET_GPU"),  # GSP RPC timeout
        (120, "RESET_GPU"),  # GSP error
        (74, "WORKFLOW_NVLINK_ERR"),
        (140, "RESET_GPU"),
        (151, "RESTART_VM"),
    ],
)
def test_faults_that_need_a_reset_quarantine_the_whole_gpu(
    xid: int, catalog_action: str, has_instance: bool
) -> None:
    result = classify(xid, has_instance)
    assert result.action is Action.QUARANTINE_GPU
    assert result.reset_required
    assert (result.catalog_action, result.source) == (catalog_action, Source.CATALOG)


@pytest.mark.parametrize("has_instance", [False, True])
def test_94_contained_error_follows_the_catalog_not_the_device_plugin(has_instance: bool) -> None:
    result = classify(94, has_instance)
    assert result.action is Action.LEASE_EVENT
    assert (result.catalog_action, result.mnemonic) == (
        "RESTART_APP",
        "ROBUST_CHANNEL_CONTAINED_ERROR",
    )
    assert not result.reset_required


def test_45_preemptive_cleanup_is_a_lease_event() -> None:
    # accelguard's own evictions make the driver log 45; quarantining on it would quarantine
    # every revoked partition.
    assert classify(45, has_instance=True).action is Action.LEASE_EVENT
    assert classify(45, has_instance=False).catalog_action == "WORKFLOW_XID_45"


@pytest.mark.parametrize(
    ("xid", "catalog_action"),
    [(54, "CHECK_MECHANICALS"), (78, "UPDATE_SWFW"), (154, "XID_154"), (169, "")],
)
def test_investigation_buckets_quarantine_the_attributed_instance_or_else_the_gpu(
    xid: int, catalog_action: str
) -> None:
    attributed = classify(xid, has_instance=True)
    assert attributed.action is Action.QUARANTINE_INSTANCE
    unattributed = classify(xid, has_instance=False)
    assert unattributed.action is Action.QUARANTINE_GPU
    for result in (attributed, unattributed):
        assert result.catalog_action == catalog_action
        assert not result.reset_required
        assert result.source is Source.CATALOG


@pytest.mark.parametrize("xid", [0, 1, 93, 121, 144, 162, 173, 1000, 2**64 - 1, -1])
def test_unknown_xids_fail_closed(xid: int) -> None:
    # 1: Unused everywhere; 93: A100 only; 121, 144, 162: Blackwell only; 173+: not in the Catalog.
    unattributed = classify(xid, has_instance=False)
    attributed = classify(xid, has_instance=True)
    assert unattributed.action is Action.QUARANTINE_GPU
    assert attributed.action is Action.QUARANTINE_INSTANCE
    for result in (unattributed, attributed):
        assert result.source is Source.UNKNOWN
        assert (result.mnemonic, result.catalog_action, result.reset_required) == ("", "", False)


@pytest.mark.parametrize(
    ("xid", "has_instance", "override", "action", "reset_required"),
    [
        (94, False, Action.QUARANTINE_GPU, Action.QUARANTINE_GPU, False),
        (94, True, Action.QUARANTINE_INSTANCE, Action.QUARANTINE_INSTANCE, False),
        (43, False, Action.LEASE_EVENT, Action.LEASE_EVENT, False),
        (79, False, Action.IGNORE, Action.IGNORE, False),
        (48, True, Action.QUARANTINE_GPU, Action.QUARANTINE_GPU, True),
        (162, True, Action.IGNORE, Action.IGNORE, False),
        # Narrowed overrides that cannot hold: a reset takes every instance down, and an event
        # without GI/CI ids has no instance to confine.
        (48, True, Action.QUARANTINE_INSTANCE, Action.QUARANTINE_GPU, True),
        (13, False, Action.QUARANTINE_INSTANCE, Action.QUARANTINE_GPU, False),
        (13, True, Action.QUARANTINE_INSTANCE, Action.QUARANTINE_INSTANCE, False),
    ],
)
def test_overrides_win(
    xid: int, has_instance: bool, override: Action, action: Action, reset_required: bool
) -> None:
    result = classify(xid, has_instance, {xid: override, 31: Action.QUARANTINE_GPU})
    assert (result.action, result.reset_required) == (action, reset_required)
    assert result.source is Source.OVERRIDE
    assert result.catalog_action == (CATALOG[xid].immediate_action if xid in CATALOG else "")


def test_an_override_for_another_xid_changes_nothing() -> None:
    assert classify(48, True, {94: Action.IGNORE}) == classify(48, True)
    assert classify(48, True, {}) == classify(48, True, None)


def test_overrides_parse_from_the_documented_toml() -> None:
    document = tomllib.loads(
        """
        [health.xid_overrides]
        "94" = "quarantine_gpu"
        43 = "lease_event"
        "162" = "ignore"
        "13" = "quarantine_instance"
        """
    )
    table = document["health"]["xid_overrides"]
    assert parse_overrides(table) == {
        94: Action.QUARANTINE_GPU,
        43: Action.LEASE_EVENT,
        162: Action.IGNORE,
        13: Action.QUARANTINE_INSTANCE,
    }
    assert parse_overrides({}) == {}
    assert parse_overrides({str(MAX_XID): "ignore"}) == {MAX_XID: Action.IGNORE}


@pytest.mark.parametrize(
    "key", ["", "0", "094", "-1", "+5", " 94", "94 ", "x", "1e3", "9.4", "\u0669\u0664", "65536"]
)
def test_bad_override_keys_are_refused_by_name(key: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(f"key {key!r} is not an XID")) as error:
        parse_overrides({"94": "ignore", key: "ignore"})
    assert "[health] xid_overrides" in str(error.value)


def test_a_huge_key_is_refused_without_converting_it() -> None:
    with pytest.raises(ValidationError, match="is not an XID"):
        parse_overrides({"9" * 100_000: "ignore"})


@pytest.mark.parametrize("value", ["", "quarantine", "QUARANTINE_GPU", "Ignore", "RESET_GPU", 3])
def test_bad_override_values_are_refused_by_name(value: object) -> None:
    with pytest.raises(ValidationError, match=re.escape(f"XID 94 = {value!r} is not an action")):
        parse_overrides({"94": value})  # type: ignore[dict-item]


def test_a_toml_integer_value_is_refused() -> None:
    table = tomllib.loads('[x]\n"94" = 1\n')["x"]
    with pytest.raises(ValidationError, match="'lease_event'"):
        parse_overrides(table)


def test_the_table_is_consistent() -> None:
    assert set(BUCKET_RESPONSES) == set(Bucket), "every Catalog bucket has an accelguard response"
    for response in BUCKET_RESPONSES.values():
        assert response.action in set(Action)
        assert response.action is not Action.QUARANTINE_INSTANCE  # narrowed per event only
        assert not response.reset_required or response.action is Action.QUARANTINE_GPU
    assert len(CATALOG) == len(xid_module._ROWS), "an XID appears twice in the table"
    for code, entry in CATALOG.items():
        assert entry.xid == code
        assert 1 <= code <= 172
        assert re.fullmatch(r"[A-Z0-9_]+( / [A-Z0-9_]+)?", entry.mnemonic), entry
        assert entry.immediate_action in BUCKET_RESPONSES


def test_a_duplicate_row_is_refused_when_the_table_is_built() -> None:
    rows = [CatalogEntry(94, "A", Bucket.RESTART_APP), CatalogEntry(94, "B", Bucket.IGNORE)]
    with pytest.raises(ValueError, match="XID 94 is in the catalog table twice"):
        xid_module._index(rows)


def test_the_catalog_rows_for_h100_are_all_there() -> None:
    # XIDs whose "Applies to H100" column is YES in the Catalog (1-172 revision).
    h100 = (
        {8, 11, 13, 14, 25, 31, 32, 37, 38, 39, 40, 41, 43, 44, 45, 46, 48, 54, 60, 62, 63, 64}
        | {66, 67, 68, 69, 70, 71, 72, 74, 75, 76, 77, 78, 79, 80, 82, 83, 84, 85, 86, 88, 89}
        | {92, 94, 95, *range(96, 106), 106, 107, 108, 109, 110, 119, 120, 136, 137, 140, 141}
        | {143, 151, 154, 156, 157, 158, 167, 168, 169, 171, 172}
    )
    assert set(CATALOG) == h100


def test_differences_from_the_device_plugin_are_the_documented_ones() -> None:
    # NVIDIA/k8s-device-plugin internal/rm/health.go: these XIDs are skipped as application
    # errors; any other critical XID marks the device unhealthy.
    plugin_skips = {13, 31, 43, 45, 68, 109}
    we_quarantine_plugin_does_not = {
        code
        for code in CATALOG
        if code in plugin_skips and classify(code, has_instance=False).action in QUARANTINES
    }
    plugin_marks_we_do_not = {
        code
        for code in CATALOG
        if code not in plugin_skips and classify(code, has_instance=False).action not in QUARANTINES
    }
    assert we_quarantine_plugin_does_not == {109}
    # docs/health.md: the IGNORE bucket, and RESTART_APP other than 13, 31 and 68.
    assert plugin_marks_we_do_not == (
        {14, 37, 38, 44, 63, 66, 67, 92, 106, 107, 108, 137, 141, 157}
        | {8, 11, 25, 32, 39, 40, 41, 60, 69, 70, 71, 72, 75, 76, 77, 80, 82, 83, 84, 85, 86}
        | {88, 89, 94, *range(96, 106)}
    )


overrides = st.dictionaries(st.integers(0, 300), st.sampled_from(Action), max_size=8)


@given(code=st.integers(-1, 400), has_instance=st.booleans(), table=st.none() | overrides)
def test_invariants_hold_for_any_xid_and_overrides(
    code: int, has_instance: bool, table: dict[int, Action] | None
) -> None:
    result = classify(code, has_instance, table)
    assert result.xid == code
    if result.action is Action.QUARANTINE_INSTANCE:
        assert has_instance
    if result.reset_required:
        assert result.action is Action.QUARANTINE_GPU
    if table is not None and code in table:
        assert result.source is Source.OVERRIDE
        wanted = table[code]
        assert result.action is wanted or (
            wanted is Action.QUARANTINE_INSTANCE and result.action is Action.QUARANTINE_GPU
        )
    elif code not in CATALOG:
        assert result.source is Source.UNKNOWN
        assert result.action in QUARANTINES
    # Attribution only ever narrows a quarantine; it never changes whether there is one.
    other = classify(code, not has_instance, table)
    assert (result.action in QUARANTINES) == (other.action in QUARANTINES)
    assert result.reset_required == other.reset_required
