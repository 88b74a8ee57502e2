"""Hostile inputs to the CLI: JSON files (agent/inputs.py) and arguments (agent/cli.py main).

The JSON reader is checked against independent answers: the depth and item count the scan finds
are compared with what a walk of the decoded Python value says, and json.dumps of any value comes
back unchanged. Arguments are given to a real `python -m agent.cli` as raw bytes, the way a shell
passes `$'\\xff'`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.cli import main
from agent.errors import ValidationError
from agent.runtime.inputs import JsonLimits, parse_json, read_bounded, read_json_file
from tests.fuzzing import MUTATIONS, fuzz, mutate
from tests.support import ACCELGUARD, REPO, RunningAgent

ROOMY = JsonLimits(max_bytes=1 << 30, max_depth=64, max_items=1 << 20)


def parsed(text: str | bytes, limits: JsonLimits = ROOMY) -> object:
    data = text.encode() if isinstance(text, str) else text
    return parse_json(data, limits, "test.json")


def refusal(text: str | bytes, limits: JsonLimits = ROOMY) -> str:
    with pytest.raises(ValidationError) as raised:
        parsed(text, limits)
    message = str(raised.value)
    assert message.startswith("test.json: "), message  # names the input
    assert "\n" not in message
    return message


# --- bytes ---------------------------------------------------------------------------------------


def test_size_is_checked_before_anything_is_read(tmp_path: Path) -> None:
    """A sparse file of 1 TiB: reading it whole would take hours and all memory; fstat says no."""
    huge = tmp_path / "huge.json"
    with huge.open("wb") as stream:
        try:
            stream.truncate(1 << 40)
        except OSError:
            pytest.skip("the file system cannot hold a sparse 1 TiB file")
    started = time.monotonic()
    with pytest.raises(ValidationError) as raised:
        read_json_file(huge, JsonLimits(4096, 8, 64), "certificate")
    assert time.monotonic() - started < 1
    assert str(raised.value) == (f"certificate {huge}: {1 << 40} bytes, over the 4096-byte limit")


def test_a_device_without_end_is_read_only_to_the_limit() -> None:
    """/dev/zero has no size to check: the reader stops one byte past the limit."""
    with pytest.raises(ValidationError, match=r"^evidence /dev/zero: more than the 1048576-byte"):
        read_bounded(Path("/dev/zero"), 1 << 20, "evidence")


def test_a_file_at_the_limit_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "exact"
    path.write_bytes(b"x" * 4096)
    assert read_bounded(path, 4096, "input") == b"x" * 4096
    path.write_bytes(b"x" * 4097)
    with pytest.raises(ValidationError, match="4097 bytes, over the 4096-byte limit"):
        read_bounded(path, 4096, "input")


@pytest.mark.parametrize(
    ("directory", "reason"),
    [(False, "cannot open: No such file or directory"), (True, "cannot read: Is a directory")],
    ids=["missing", "directory"],
)
def test_unreadable_files_are_one_clear_error(tmp_path: Path, directory: bool, reason: str) -> None:
    path = tmp_path / "input.json"
    if directory:
        path.mkdir()
    with pytest.raises(ValidationError, match=f"^policy {path}: {reason}$"):
        read_json_file(path, ROOMY, "policy")


# --- strict decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"a": 1, "a": 2}', "member name 'a' appears twice"),
        ('{"payload": {"verified": false, "verified": true}}', "'verified' appears twice"),
        ('[{"x": 1}, {"y": {"z": 1, "z": 1}}]', "'z' appears twice"),
        ("NaN", "NaN is not a JSON number"),
        ('{"bytes_total": Infinity}', "Infinity is not a JSON number"),
        ("[-Infinity]", "-Infinity is not a JSON number"),
        ("1e400", "number 1e400 is out of range"),
        ("[-1.5e999]", "number -1.5e999 is out of range"),
        ('"\\ud800"', "unpaired surrogate"),
        ('{"\\udc00": 1}', "unpaired surrogate"),
        ('["\\ude00\\ud83d"]', "unpaired surrogate"),
        ("1" * 5000, "not valid JSON: Exceeds the limit"),
        ('{"a": 1,}', "not valid JSON"),
        ("", "not valid JSON"),
    ],
)
def test_not_i_json_is_refused(text: str, reason: str) -> None:
    assert reason in refusal(text)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"a": "\xff"}', "not UTF-8 text (byte 7: invalid start byte)"),
        (b'"\xc0\xaf"', "not UTF-8 text (byte 1"),  # overlong '/'
        (b'"\xed\xa0\x80"', "not UTF-8 text (byte 1"),  # a surrogate, encoded
        ('{"a": 1}'.encode("utf-16"), "not UTF-8 text"),  # json.loads(bytes) would take it
        ('{"a": 1}'.encode("utf-32-le"), "not valid JSON"),
        (b'\xef\xbb\xbf{"a": 1}', "byte order mark"),
    ],
)
def test_only_utf8_is_read(data: bytes, reason: str) -> None:
    assert reason in refusal(data)


def test_what_i_json_allows_is_read() -> None:
    assert parsed('{"a": "\\ud83d\\ude00", "b": [1.5, -0, 1e308, true, null], "c": "é"}') == {
        "a": "\U0001f600",
        "b": [1.5, 0, 1e308, True, None],
        "c": "é",
    }


# --- shape -------------------------------------------------------------------------------------


def test_depth_limit_is_exact() -> None:
    limits = JsonLimits(1 << 20, max_depth=4, max_items=100)
    assert parsed('{"a": [[{}]]}', limits) == {"a": [[{}]]}
    assert refusal('{"a": [[{"b": 1}]], "c": [[[[[]]]]]}', limits) == (
        "test.json: nested deeper than 4 levels"
    )


def test_item_limit_is_exact() -> None:
    limits = JsonLimits(1 << 20, max_depth=8, max_items=6)
    # [ 3 elements ] + {"a": 1, "b": []} 2 members + the empty array counted once = 6
    assert parsed('[1, {"a": 1, "b": []}, "x"]', limits)
    assert refusal('[1, {"a": 1, "b": []}, "x", 2]', limits) == (
        "test.json: more than 6 array elements and object members"
    )


def test_structure_inside_strings_is_not_counted() -> None:
    limits = JsonLimits(1 << 20, max_depth=1, max_items=1)
    tricky = '["[[[{{,,,\\"]]]]\\\\", "x"]'
    with pytest.raises(ValidationError, match="more than 1 array elements"):
        parsed(tricky, limits)  # two elements: the commas and brackets in the string are text
    assert parsed('["[[[{{,,,\\"]]]]\\\\"]', limits) == ['[[[{{,,,"]]]]\\']


def test_deep_nesting_is_refused_without_recursion() -> None:
    """Ten million levels: json alone raises RecursionError (or crashes, with a raised limit)."""
    started = time.monotonic()
    assert (
        refusal(b"[" * 10_000_000 + b"]" * 10_000_000) == "test.json: nested deeper than 64 levels"
    )
    assert time.monotonic() - started < 5


def test_many_small_items_are_refused_before_json_builds_them() -> None:
    """100 MB of ``{},`` is 33 million dicts, several GB as Python objects."""
    started = time.monotonic()
    message = refusal(b"[" + b"{}," * 33_000_000 + b"{}]", JsonLimits(1 << 30, 8, 1024))
    assert message == "test.json: more than 1024 array elements and object members"
    assert time.monotonic() - started < 5


def test_an_unterminated_string_is_scanned_once() -> None:
    """Quotes that never close, backslash-escaped: a scan that restarted at every quote would
    take quadratic time here."""
    started = time.monotonic()
    assert "not valid JSON" in refusal(b'"' + b'\\"' * 5_000_000 + b"\\")
    assert time.monotonic() - started < 5


def _shape(value: object) -> tuple[int, int]:
    """(depth, items) of a decoded value, by walking it: the independent answer to the scan."""
    if isinstance(value, dict):
        children = list(value.values())
    elif isinstance(value, list):
        children = value
    else:
        return 0, 0
    shapes = [_shape(child) for child in children]
    return 1 + max((d for d, _ in shapes), default=0), max(len(children), 1) + sum(
        i for _, i in shapes
    )


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(exclude_categories=["Cs"])),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=6), children, max_size=5),
    max_leaves=30,
)
dumps_options = st.sampled_from(
    [{}, {"ensure_ascii": False}, {"indent": 2}, {"separators": (",", ":")}, {"indent": "\t"}]
)


@fuzz(2000)
@given(json_values, dumps_options)
def test_scan_agrees_with_the_decoded_value(value: Any, options: dict[str, Any]) -> None:
    data = json.dumps(value, **options).encode()
    depth, items = _shape(value)
    exact = JsonLimits(len(data), max_depth=depth, max_items=items)
    assert parse_json(data, exact, "v") == value
    if depth:
        with pytest.raises(ValidationError, match="nested deeper"):
            parse_json(data, JsonLimits(len(data), depth - 1, items), "v")
        with pytest.raises(ValidationError, match="array elements and object members"):
            parse_json(data, JsonLimits(len(data), depth, items - 1), "v")


SAMPLE = json.dumps(
    {
        "payload": {"a": [1, 2, {"b": 'x\\"y'}], "c": "é\u2028", "d": -1.5e10, "e": None},
        "list": [[], {}, [[["deep"]]]],
    }
).encode()


@fuzz(3000)
@given(MUTATIONS)
def test_mutated_documents_raise_only_validation_error(mutations: Any) -> None:
    data = mutate(SAMPLE, mutations)
    try:
        parse_json(data, JsonLimits(1 << 20, max_depth=5, max_items=40), "m")
    except ValidationError as error:
        assert str(error).startswith("m: ")


# --- command-line arguments --------------------------------------------------------------------


def cli_bytes(*args: bytes | str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*ACCELGUARD, *args], capture_output=True, timeout=120, check=False, cwd=REPO
    )


def assert_one_line_refusal(result: subprocess.CompletedProcess[bytes], *fragments: str) -> None:
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (
            [b"lease", b"grant", b"--tenant", b"\xff", b"--profile", b"gpu", b"--cgroup", b"/x"],
            ["argument 4, b'\\xff' (after --tenant), is not valid UTF-8"],
        ),
        (
            b"lease grant --tenant t --cgroup /x --partition MIG-\xc3\x28-4a59".split(),
            ["argument 8, b'MIG-\\xc3(-4a59' (after --partition)"],
        ),
        ([b"lease", b"grant", b"--tenant=caf\xe9"], ["argument 3, b'--tenant=caf\\xe9',"]),
        ([b"scrub", b"verify-cert", b"/tmp/\xfe.json"], ["argument 3, b'/tmp/\\xfe.json',"]),
        ([b"--config", b"/etc/\x80.toml", b"status"], ["argument 2", "(after --config)"]),
    ],
    ids=["tenant", "partition", "option=value", "file", "config"],
)
def test_non_utf8_argument_is_one_line_exit_2(argv: list[bytes], fragments: list[str]) -> None:
    assert_one_line_refusal(cli_bytes(*argv), *fragments)


def test_non_utf8_tenant_changes_nothing_on_a_running_agent(agent: RunningAgent) -> None:
    """What the issue saw: the grant reached protobuf encoding and died with a traceback."""
    config = str(agent.config_path).encode()
    result = cli_bytes(b"--config", config, b"lease", b"grant", b"--tenant", b"ten\xffant",
                       b"--profile", b"gpu", b"--cgroup", b"/sys/fs/cgroup/t")  # fmt: skip
    assert_one_line_refusal(result, "(after --tenant), is not valid UTF-8")
    assert agent.cli_json("lease", "list", "--all") == {"leases": []}  # none was created


def test_utf8_arguments_pass(tmp_path: Path) -> None:
    directory = tmp_path / "nœud-ü"
    directory.mkdir()
    config = directory / "agent.toml"
    config.write_text('[node]\nid = "nœud-7"\n')
    result = cli_bytes(b"--config", os.fsencode(config), b"config", b"check")
    assert result.returncode == 0, result.stderr
    assert 'id = "nœud-7"' in result.stdout.decode()


def test_lone_surrogate_passed_in_process_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """main(argv) from Python: a surrogate that no argv byte decodes to is refused the same way."""
    assert main(["lease", "grant", "--tenant", "\ud800"]) == 2
    assert (
        "argument 4, b'\\\\ud800' (after --tenant), is not valid UTF-8" in capsys.readouterr().err
    )
