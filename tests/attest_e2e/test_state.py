"""The verifier's per-AK state file: round trip, strict reading, atomic locked updates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.attest.tpm.checks import ClockState
from agent.attest.verify.report import ImaProgress
from agent.attest.verify.state import VerifierState, load_state, open_state, save_state
from agent.errors import AttestationError

NAME = b"\x00\x0b" + bytes(range(32))


def test_missing_file_is_an_empty_state(tmp_path: Path) -> None:
    state = load_state(tmp_path / "absent.json")
    assert state.clock_state(NAME) is None and state.ima_progress(NAME) is None


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    document = {
        "version": 1,
        "aks": {
            NAME.hex(): {
                "clock": 1234,
                "reset_count": 3,
                "restart_count": 1,
                "updated_at": 1.5,
                "ima": {"reset_count": 3, "next_index": 7, "pcrs": {"sha256": {"10": "ab" * 32}}},
            }
        },
    }
    path.write_text(json.dumps(document))
    state = load_state(path)
    assert state.clock_state(NAME) == ClockState(NAME, 1234, 3, 1)
    assert state.ima_progress(NAME) == ImaProgress(3, 7, {"sha256": {10: b"\xab" * 32}})
    save_state(state, tmp_path / "copy.json")
    assert json.loads((tmp_path / "copy.json").read_text()) == document
    assert (tmp_path / "copy.json").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("document", "where"),
    [
        ("not json", "file"),
        ({"version": 2, "aks": {}}, "version"),
        ({"version": 1}, "aks"),
        ({"version": 1, "aks": {"zz": {}}}, "aks.zz"),
        ({"version": 1, "aks": {NAME.hex(): {"clock": -1, "reset_count": 0, "restart_count": 0}}},
         "aks."),
        ({"version": 1, "aks": {NAME.hex(): {"clock": 1, "reset_count": 0, "restart_count": 0,
                                            "ima": {"reset_count": 0, "next_index": "x"}}}},
         ".ima"),
        ({"version": 1, "aks": {NAME.hex(): {"clock": 1, "reset_count": 0, "restart_count": 0,
                                            "ima": {"reset_count": 0, "next_index": 0,
                                                    "pcrs": {"sha256": {"10": "00"}}}}}},
         ".ima"),
    ],
)  # fmt: skip
def test_malformed_state_names_the_key(tmp_path: Path, document: object, where: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    with pytest.raises(AttestationError, match=f"verifier state {path}: .*{where}"):
        load_state(path)


def test_open_state_saves_only_on_change(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    with open_state(path) as state:
        assert not state.changed
    assert not path.exists()
    assert (tmp_path / "state.json.lock").exists()


def test_unwritable_state_is_an_attestation_error(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="cannot write verifier state"):
        save_state(VerifierState(), tmp_path / "no-such-dir" / "state.json")
