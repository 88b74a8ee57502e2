"""The CLI's output contract (issue 15): ``-o table|wide|json``, JSON numbers as numbers, times as
RFC 3339 or null, one JSON shape per resource, table headers, a message when a list is empty,
durations people read and write. Each runs the real CLI against a real agent on a simulated node.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.cli.output import message_dict
from agent.proto.accelguard.v1 import admin_pb2, controller_pb2
from agent.runtime.durations import human_duration, parse_duration
from tests.leases.helpers import any_tenant_cgroup
from tests.support import RunningAgent, run_cli, wait_all_clean

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def _time(text: str) -> float:
    assert RFC3339.fullmatch(text), text
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _grant(agent: RunningAgent, cgroup: Path, *extra: str) -> dict[str, Any]:
    return dict(
        agent.cli_json(
            "lease", "grant", "--tenant", "tess", "--profile", "1g.10gb", "--cgroup", str(cgroup),
            *extra,
        )
    )  # fmt: skip


@pytest.fixture
def node(lease_agent: RunningAgent) -> RunningAgent:
    lease_agent.cli_json("layout", "apply", "--gpu", "0", "1g.10gb=2")
    wait_all_clean(lease_agent)
    return lease_agent


# --- JSON: numbers, times, one shape --------------------------------------------------------------


def test_json_integers_are_numbers_and_times_rfc3339(
    node: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    status = node.cli_json("status")
    sizes = [gpu["memory_total_bytes"] for gpu in status["gpus"]]
    assert sizes and all(isinstance(size, int) and size > 2**32 for size in sizes), sizes
    instances = [i for gpu in status["gpus"] for i in gpu["instances"]]
    assert len(instances) == 2
    assert all(isinstance(i["memory_bytes"], int) and i["memory_bytes"] > 0 for i in instances)

    cgroup = any_tenant_cgroup(cgroup_parents, "output")
    grant = _grant(node, cgroup, "--ttl", "2h")
    lease = grant["lease"]
    created, expires = _time(lease["created_at"]), _time(lease["expires_at"])
    # "2h" is 7200 s; the times are printed to the millisecond.
    assert abs(expires - created - 7200) < 0.002
    assert lease["released_at"] is None

    released = node.cli_json("lease", "list", "--all")["leases"]
    assert [entry["id"] for entry in released] == [lease["id"]]
    node.cli_json("lease", "release", lease["id"])
    [ended] = node.cli_json("lease", "list", "--all")["leases"]
    assert _time(ended["released_at"]) >= created


def test_no_expiry_is_null(node: RunningAgent, cgroup_parents: dict[str, Path]) -> None:
    lease = _grant(node, any_tenant_cgroup(cgroup_parents, "forever"))["lease"]
    assert lease["expires_at"] is None
    # -o json is --json.
    same = node.cli("lease", "list", "-o", "json")
    assert same.returncode == 0, same.stderr
    assert json.loads(same.stdout) == node.cli_json("lease", "list")


def test_scrub_certs_json_is_what_verify_cert_takes(
    node: RunningAgent, cgroup_parents: dict[str, Path], tmp_path: Path
) -> None:
    lease = _grant(node, any_tenant_cgroup(cgroup_parents, "certs"))["lease"]
    node.cli_json("lease", "release", lease["id"])
    listing = node.cli("scrub", "certs", "--json")
    assert listing.returncode == 0, listing.stderr
    document = json.loads(listing.stdout)
    assert list(document) == ["certificates"]
    count = len(document["certificates"])
    assert count >= 3  # the two new instances' first scrubs and the release's
    file = tmp_path / "certs.json"
    file.write_text(listing.stdout)
    checked = run_cli("scrub", "verify-cert", str(file), config=node.config_path)
    assert checked.returncode == 0, checked.stderr
    lines = checked.stdout.splitlines()
    assert len(lines) == count
    assert all(f"of {count}: signature OK" in line for line in lines), lines

    # One forged certificate in the list fails the whole file, naming which one.
    forged = json.loads(listing.stdout)
    forged["certificates"][1]["payload"]["coverage"] = "1 of 1 bytes (100%)"
    file.write_text(json.dumps(forged))
    refused = run_cli("scrub", "verify-cert", str(file), config=node.config_path)
    assert refused.returncode != 0
    assert f"certificate 2 of {count}: " in refused.stderr, refused.stderr


# --- tables ---------------------------------------------------------------------------------------


def test_tables_have_headers_and_say_when_empty(
    node: RunningAgent, cgroup_parents: dict[str, Path]
) -> None:
    empty = node.cli("lease", "list")
    assert empty.returncode == 0, empty.stderr
    assert (empty.stdout, empty.stderr.strip()) == ("", "no live leases")

    lease = _grant(node, any_tenant_cgroup(cgroup_parents, "table"), "--ttl", "90m")["lease"]
    table = node.cli("lease", "list")
    header, row = table.stdout.splitlines()
    assert header.split() == ["ID", "TENANT", "PARTITION", "STATE", "AGE", "EXPIRES"]
    cells = row.split()
    assert cells[:4] == [lease["id"], "tess", lease["partition_uuid"], "active"]
    assert cells[5] == "in" and re.fullmatch(r"(1h29m|1h30m)[\d.]*s?", cells[6]), cells
    # The columns line up under their headers.
    assert row.index(lease["partition_uuid"]) == header.index("PARTITION")

    wide = node.cli("lease", "list", "-o", "wide").stdout.splitlines()
    assert "CGROUP" in wide[0] and "RELEASE REASON" in wide[0]
    assert lease["cgroup"] in wide[1]

    partitions = node.cli("partition", "list").stdout.splitlines()
    assert partitions[0].split()[:4] == ["UUID", "GPU", "PROFILE", "STATE"]
    assert len(partitions) == 1 + len(node.partitions())


def test_json_and_output_together_are_refused(node: RunningAgent) -> None:
    result = node.cli("lease", "list", "--json", "-o", "wide")
    assert result.returncode == 2
    assert "argument -o/--output: not allowed with argument --json" in result.stderr


# --- durations ------------------------------------------------------------------------------------


def test_ttl_error_is_a_human_duration(node: RunningAgent, cgroup_parents: dict[str, Path]) -> None:
    cgroup = any_tenant_cgroup(cgroup_parents, "ttl")
    result = node.cli(
        "lease", "grant", "--tenant", "t", "--profile", "1g.10gb", "--cgroup", str(cgroup),
        "--ttl", "3000000",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "accelguard: error: ttl 34d17h20m: must be between 0 (no expiry) and 30d (leases.max_ttl_s)"
    )
    bad = node.cli("lease", "grant", "--tenant", "t", "--profile", "1g.10gb", "--cgroup",
                   str(cgroup), "--ttl", "2 hours")  # fmt: skip
    assert bad.returncode == 2
    assert "'2 hours' is not a duration" in bad.stderr
    assert node.cli_json("lease", "list")["leases"] == []


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90.0), ("90s", 90.0), ("15m", 900.0), ("2h30m", 9000.0), ("30d", 2592000.0),
     ("250ms", 0.25), ("1.5h", 5400.0), ("1m0.5s", 60.5)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "x", "-1", "inf", "nan", "2 h", "h", "1e999", "5y"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_duration(text)


@given(st.floats(min_value=0, max_value=1e9, allow_nan=False))
def test_human_duration_reads_back(seconds: float) -> None:
    text = human_duration(seconds)
    assert re.fullmatch(r"(\d+d)?(\d+h)?(\d+m)?([\d.]+s)?", text) and text, text
    assert math.isclose(parse_duration(text), seconds, abs_tol=0.0006)


def test_human_duration_examples() -> None:
    assert [human_duration(s) for s in (0, 0.25, 90, 5400.5, 2592000, 3000000)] == [
        "0s", "0.25s", "1m30s", "1h30m0.5s", "30d", "34d17h20m",
    ]  # fmt: skip


# --- the conversion itself, on messages with every kind of field --------------------------------


def test_message_dict_converts_nested_repeated_and_map_fields() -> None:
    node = controller_pb2.NodeSummary(node_id="n1", reports=2**40, last_seen=0.0)
    detail = controller_pb2.NodeDetail(
        summary=node, last_attested_at=1_800_000_000.5, reports_by_kind={"lease": 2**33}
    )
    document = message_dict(detail)
    assert document["summary"]["reports"] == 2**40
    assert document["summary"]["last_seen"] is None
    assert document["reports_by_kind"] == {"lease": 2**33}
    assert document["last_attested_at"] == "2027-01-15T08:00:00.500Z"
    leases = admin_pb2.ListLeasesResponse(
        leases=[admin_pb2.Lease(id="l", created_at=1.0, expires_at=0.0)]
    )
    [lease] = message_dict(leases)["leases"]
    assert (lease["created_at"], lease["expires_at"]) == ("1970-01-01T00:00:01.000Z", None)
    # Not times: a power reading stays a number; int64 counters are numbers, -1 too.
    gpu = message_dict(admin_pb2.GpuHealthStatus(power_w=41.5, ecc_volatile_dbe=3,
                                                 ecc_volatile_sbe=-1))  # fmt: skip
    assert (gpu["power_w"], gpu["ecc_volatile_dbe"], gpu["ecc_volatile_sbe"]) == (41.5, 3, -1)


# --- ctl: a stale controller socket ---------------------------------------------------------------


def test_ctl_with_stale_controller_socket_is_one_line(tmp_path: Path) -> None:
    admin = tmp_path / "controller.sock"
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(admin))
    left.close()
    config = tmp_path / "controller.toml"
    config.write_text(f'[controller]\nadmin_socket = "{admin}"\nstate_dir = "{tmp_path}/c"\n')
    result = run_cli("ctl", "--controller-config", str(config), "nodes")
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.splitlines()
    assert line == (
        f"accelguard: error: cannot reach the controller at {admin} (a stale socket: nothing "
        "listens on it): is `accelguard controller serve` running?"
    )
