"""The quote decoders and verify_quote on hostile input: arbitrary bytes and mutations of real
swtpm structures. Decoders may only raise QuoteError; verify_quote may not raise at all, and a
changed quote or signature never verifies."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.attest.tpm.checks import check_ak_attributes, verify_quote
from agent.attest.tpm.client import TpmClient
from agent.attest.tpm.credential import make_credential
from agent.attest.tpm.keys import AkAlgorithm
from agent.attest.tpm.wire import (
    compute_name,
    decode_attest,
    decode_public,
    decode_public_area,
    decode_quote_info,
    decode_signature,
)
from agent.errors import AttestationError, QuoteError

SELECTION = {"sha1": list(range(24)), "sha256": list(range(24))}
FUZZ = settings(
    max_examples=3000,
    deadline=None,  # tests never assert time; CI machines are noisy
    database=None,  # leave nothing behind in the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DECODERS: list[Callable[[bytes], object]] = [
    decode_attest,
    decode_quote_info,
    decode_signature,
    decode_public,
    decode_public_area,
    compute_name,
    check_ak_attributes,
]


@dataclass(frozen=True)
class Evidence:
    ak_public: bytes
    attest: bytes
    signature: bytes
    pcrs: dict[str, dict[int, bytes]]
    nonce: bytes
    ek_public: bytes


@pytest.fixture(scope="module")
def evidence(tpm: TpmClient) -> Iterator[dict[str, Evidence]]:
    collected = {}
    for algorithm in AkAlgorithm:
        key = tpm.create_attestation_key(algorithm)
        try:
            nonce = os.urandom(20)
            quote = tpm.quote(key, SELECTION, nonce)
        finally:
            tpm.flush_attestation_key(key)
        collected[str(algorithm)] = Evidence(
            key.public,
            quote.attest,
            quote.signature,
            quote.pcrs,
            nonce,
            tpm.endorsement_key().public,
        )
    return collected


@st.composite
def mutations(draw: st.DrawFn, original: bytes) -> bytes:
    """A few byte-level edits of the kind that reach past the first field: flips, overwritten
    sizes, truncation, insertion and deletion."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, max(0, len(data) - 1)))
        kind = draw(st.sampled_from(["flip", "byte", "size", "truncate", "insert", "delete"]))
        if kind == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte" and data:
            data[position] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]))
        elif kind == "size" and len(data) >= 2:
            value = draw(st.sampled_from([0, 1, 2, 31, 32, 33, 64, 65, 256, 511, 513, 0xFFFF]))
            end = min(position + 2, len(data))
            data[end - 2 : end] = value.to_bytes(2, "big")
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[position : position + draw(st.integers(1, 8))]
    return bytes(data)


def _decode_all(data: bytes) -> None:
    for decoder in DECODERS:
        with contextlib.suppress(QuoteError):
            decoder(data)


@FUZZ
@given(st.binary(max_size=700))
def test_arbitrary_bytes_raise_only_quote_error(data: bytes) -> None:
    _decode_all(data)


def _tpm2b_public(body: bytes) -> bytes:
    return len(body).to_bytes(2, "big") + body


# Valid leading fields, so that random tails reach the selection, the digests and the unique
# fields instead of failing on the first byte.
PREFIXED = st.one_of(
    st.binary(max_size=300).map(lambda tail: b"\xffTCG\x80\x18" + tail),
    st.binary(max_size=300).map(lambda tail: b"\xffTCG\x80\x18\x00\x00\x00\x00" + bytes(25) + tail),
    st.binary(max_size=300).map(lambda tail: b"\x00\x00\x00\x01\x00\x0b\x03" + tail),
    st.binary(max_size=300).map(lambda tail: b"\x00\x18\x00\x0b" + tail),
    st.binary(max_size=300).map(lambda tail: b"\x00\x14\x00\x0b" + tail),
    st.binary(max_size=300).map(
        lambda tail: _tpm2b_public(b"\x00\x23\x00\x0b\x00\x05\x00\x72\x00\x00" + tail)
    ),
    st.binary(max_size=400).map(
        lambda tail: _tpm2b_public(b"\x00\x01\x00\x0b\x00\x05\x00\x72\x00\x00" + tail)
    ),
)


@settings(FUZZ, max_examples=2000)
@given(PREFIXED)
def test_plausible_prefixes_raise_only_quote_error(data: bytes) -> None:
    _decode_all(data)
    with contextlib.suppress(AttestationError):
        make_credential(data, b"\x00\x0b" + bytes(32), b"secret")


@settings(FUZZ, max_examples=1500)
@given(
    st.sampled_from(["ecc-p256", "rsa-2048"]),
    st.sampled_from(["ak_public", "attest", "signature", "ek_public"]),
    st.data(),
)
def test_mutated_real_structures(
    evidence: dict[str, Evidence], algorithm: str, part: str, data: st.DataObject
) -> None:
    real = evidence[algorithm]
    original: bytes = getattr(real, part)
    mutated = data.draw(mutations(original))
    _decode_all(mutated)
    with contextlib.suppress(AttestationError):
        make_credential(mutated, b"\x00\x0b" + bytes(32), b"secret")
    parts = {
        "ak_public": real.ak_public,
        "attest": real.attest,
        "signature": real.signature,
        part: mutated,
    }
    result = verify_quote(
        parts["ak_public"],
        parts["attest"],
        parts["signature"],
        real.pcrs,
        real.nonce,
        SELECTION,
        None,
    )
    if part in ("attest", "signature") and mutated != original:
        assert not result.ok


@settings(FUZZ, max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(["sha1", "sha256", "sha384", "bogus"]) | st.text(max_size=4),
        st.dictionaries(st.integers(-2, 40), st.binary(max_size=40), max_size=8)
        | st.integers()
        | st.none(),
        max_size=4,
    ),
    st.binary(max_size=80) | st.none(),
)
def test_verify_quote_with_arbitrary_pcr_values_and_nonce(
    evidence: dict[str, Evidence], pcrs: dict[str, object], nonce: bytes | None
) -> None:
    real = evidence["ecc-p256"]
    result = verify_quote(
        real.ak_public,
        real.attest,
        real.signature,
        pcrs,  # type: ignore[arg-type]
        nonce,
        SELECTION,
        None,
    )
    if pcrs != real.pcrs:
        assert not result.ok
