"""The evidence document parser: strict, bounded, and only ever raising AttestationError.

The documents here are built in software (agent.bench.attest's quote signed by a P-256 key
shaped like an AK) so the parser and the verifier can be fuzzed without a TPM.
"""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from agent.attest.evidence import (
    MAX_DOCUMENT_BYTES,
    MAX_NONCE_BYTES,
    Evidence,
    evidence_from_dict,
    parse_evidence,
)
from agent.attest.verify.engine import verify_evidence
from agent.bench.attest import software_quote
from agent.errors import AttestationError
from tests.attest_e2e.helpers import boot_measurements, ima_list, real_log
from tests.fuzzing import fuzz


def software_evidence() -> Evidence:
    nonce = b"\x5a" * 32
    ak_public, attest, signature, pcrs = software_quote(
        ec.generate_private_key(ec.SECP256R1()), nonce
    )
    return Evidence(
        ak_public=ak_public,
        quote=attest,
        signature=signature,
        pcrs=pcrs,
        nonce=nonce,
        event_log=real_log("event-uefiaction.bin"),
        ima_log=ima_list(boot_measurements()),
        ima_start_index=0,
        ek_certificate=b"\x30\x03\x02\x01\x01",
    )


EVIDENCE = software_evidence()
DOCUMENT = EVIDENCE.to_dict()


def error_of(document: Any) -> str:
    with pytest.raises(AttestationError) as raised:
        parse_evidence(json.dumps(document))
    return str(raised.value)


def test_round_trip() -> None:
    assert parse_evidence(EVIDENCE.to_json()) == EVIDENCE
    assert parse_evidence(EVIDENCE.to_json().encode()) == EVIDENCE
    minimal = {k: v for k, v in DOCUMENT.items() if k not in ("ima_log", "ima_start_index")}
    parsed = evidence_from_dict(minimal)
    assert parsed.ima_log is None and parsed.ima_start_index == 0


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"version": 2}, "evidence.version"),
        ({"version": 1.0}, "evidence.version"),
        ({"version": True}, "evidence.version"),
        ({"extra": 1}, "evidence.extra: unknown field"),
        ({"quote": None}, "evidence.quote: must be a base64 string"),
        ({"quote": "not base64!"}, "evidence.quote: not base64"),
        ({"quote": "AAE"}, "evidence.quote: not base64"),
        ({"quote": "AB=="}, "evidence.quote: non-canonical base64"),
        ({"quote": ""}, "evidence.quote: must not be empty"),
        ({"quote": "A" * 8000}, "evidence.quote: longer than the 4096-byte limit"),
        ({"signature": 5}, "evidence.signature"),
        ({"ak_public": []}, "evidence.ak_public"),
        ({"event_log": "===="}, "evidence.event_log"),
        ({"ima_log": {}}, "evidence.ima_log"),
        ({"ek_certificate": "x"}, "evidence.ek_certificate"),
        ({"nonce": "XYZ"}, "evidence.nonce"),
        ({"nonce": "AB"}, "evidence.nonce"),
        ({"nonce": "0" * (2 * MAX_NONCE_BYTES + 2)}, "evidence.nonce"),
        ({"nonce": 12}, "evidence.nonce"),
        ({"pcrs": {}}, "evidence.pcrs"),
        ({"pcrs": []}, "evidence.pcrs"),
        ({"pcrs": {"md5": {"0": "00" * 16}}}, "evidence.pcrs.md5: unknown bank"),
        ({"pcrs": {"sha256": {}}}, "evidence.pcrs.sha256"),
        ({"pcrs": {"sha256": {"24": "00" * 32}}}, "evidence.pcrs.sha256.24"),
        ({"pcrs": {"sha256": {"07": "00" * 32}}}, "evidence.pcrs.sha256.07"),
        ({"pcrs": {"sha256": {"x": "00" * 32}}}, "evidence.pcrs.sha256.x"),
        ({"pcrs": {"sha256": {"7": "00" * 20}}}, "evidence.pcrs.sha256.7"),
        ({"pcrs": {"sha256": {"7": None}}}, "evidence.pcrs.sha256.7"),
        ({"ima_start_index": -1}, "evidence.ima_start_index"),
        ({"ima_start_index": "3"}, "evidence.ima_start_index"),
        ({"ima_start_index": 10**9}, "evidence.ima_start_index"),
    ],
)
def test_each_malformed_field_is_named(change: dict[str, Any], expected: str) -> None:
    assert expected in error_of({**DOCUMENT, **change})


@pytest.mark.parametrize("field", ["version", "ak_public", "quote", "signature", "pcrs", "nonce",
                                   "event_log"])  # fmt: skip
def test_missing_required_field(field: str) -> None:
    document = {k: v for k, v in DOCUMENT.items() if k != field}
    assert f"evidence.{field}: required" in error_of(document)


def test_document_level_errors() -> None:
    minimal = {k: v for k, v in DOCUMENT.items() if k != "ima_log"}
    assert "given without ima_log" in error_of(minimal)
    assert "must be a JSON object" in error_of([DOCUMENT])
    for text in ("{", "", "NaN", '{"version": Infinity}', "[" * 100_000):
        with pytest.raises(AttestationError, match="evidence"):
            parse_evidence(text)
    duplicated = EVIDENCE.to_json().replace('"version": 1', '"version": 1, "version": 1')
    with pytest.raises(AttestationError, match="appears twice"):
        parse_evidence(duplicated)
    with pytest.raises(AttestationError, match="over the"):
        parse_evidence(b" " * (MAX_DOCUMENT_BYTES + 1))
    with pytest.raises(AttestationError, match="expected JSON text"):
        parse_evidence(None)  # type: ignore[arg-type]


# --- fuzzing ------------------------------------------------------------------------------------

SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
# Two levels of nesting reach every shape the parser distinguishes; deeper recursion only costs
# generation time.
JSON_VALUES = (
    SCALARS
    | st.lists(SCALARS, max_size=3)
    | st.dictionaries(st.text(max_size=6), SCALARS | st.dictionaries(st.text(max_size=3), SCALARS,
                      max_size=3), max_size=3)
)  # fmt: skip
FIELDS = sorted(DOCUMENT)


@fuzz(3000)
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(AttestationError):
        parse_evidence(data)


@fuzz(2000)
@given(JSON_VALUES)
def test_fuzz_arbitrary_json(document: object) -> None:
    with contextlib.suppress(AttestationError):
        evidence_from_dict(document)


@fuzz(3000)
@given(st.sampled_from(FIELDS), JSON_VALUES | st.binary(max_size=80).map(
    lambda b: base64.b64encode(b).decode()))  # fmt: skip
def test_fuzz_one_field_replaced(field: str, value: object) -> None:
    try:
        parsed = evidence_from_dict({**DOCUMENT, field: value})
    except AttestationError as error:
        assert str(error).startswith("evidence")
    else:
        # Whatever passes the parser is a well-formed document the verifier can judge.
        verify_evidence(parsed, EVIDENCE.nonce, None, None)


@fuzz(1500)
@given(st.integers(0, 10**6), st.integers(0, 255), st.integers(1, 3))
def test_fuzz_text_mutations(position: int, value: int, count: int) -> None:
    text = bytearray(EVIDENCE.to_json().encode())
    for step in range(count):
        text[(position + 997 * step) % len(text)] = value
    with contextlib.suppress(AttestationError):
        parse_evidence(bytes(text))


@fuzz(1500)
@given(
    st.sampled_from(["ak_public", "quote", "signature", "event_log", "ima_log"]),
    st.integers(0, 2**16),
    st.binary(min_size=1, max_size=8),
    st.booleans(),
)
def test_fuzz_verify_never_raises_and_never_passes_a_changed_quote(
    field: str, position: int, patch: bytes, truncate: bool
) -> None:
    original: bytes = getattr(EVIDENCE, field)
    where = position % len(original)
    if truncate:
        changed = original[:where]
    else:
        changed = original[:where] + patch + original[where + len(patch) :]
    evidence = Evidence(**{**EVIDENCE.__dict__, field: changed})
    report = verify_evidence(evidence, EVIDENCE.nonce, None, None, {"sha256": list(range(24))})
    if field in ("quote", "signature", "ak_public") and changed != original:
        assert not report.ok
