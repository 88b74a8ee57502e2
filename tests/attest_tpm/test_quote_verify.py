"""verify_quote on real swtpm quotes: a genuine quote passes, and each tampering fails with its
own reason. Where a tampered quote would also break the signature, the same tampering is
re-signed with a software key so that the one check under test is seen on its own."""

from __future__ import annotations

import dataclasses
import os
import struct
import time

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from agent.attest.tpm.checks import (
    AK_ATTRIBUTES,
    QuoteCheckResult,
    Reason,
    check_ak_attributes,
    verify_quote,
)
from agent.attest.tpm.client import Quote, TpmClient
from agent.attest.tpm.keys import AttestationKey
from agent.attest.tpm.wire import ATTR_DECRYPT, ATTR_RESTRICTED, decode_attest
from agent.errors import QuoteError

SELECTION = {"sha1": list(range(24)), "sha256": list(range(24))}


# --- software keys that look like AKs, to sign doctored quotes ---------------------------------


def _ecc_public(key: ec.EllipticCurvePrivateKey, attributes: int = AK_ATTRIBUTES) -> bytes:
    numbers = key.public_key().public_numbers()
    area = struct.pack(">HHIH", 0x0023, 0x000B, attributes, 0)  # ECC, SHA-256, no policy
    area += struct.pack(">HHHHH", 0x0010, 0x0018, 0x000B, 0x0003, 0x0010)  # ECDSA P-256
    area += struct.pack(">H", 32) + numbers.x.to_bytes(32, "big")
    area += struct.pack(">H", 32) + numbers.y.to_bytes(32, "big")
    return struct.pack(">H", len(area)) + area


def _ecdsa_sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return (
        struct.pack(">HHH", 0x0018, 0x000B, 32)
        + r.to_bytes(32, "big")
        + (struct.pack(">H", 32) + s.to_bytes(32, "big"))
    )


def _rsa_pss_public(key: rsa.RSAPrivateKey) -> bytes:
    modulus = key.public_key().public_numbers().n.to_bytes(256, "big")
    area = struct.pack(">HHIH", 0x0001, 0x000B, AK_ATTRIBUTES, 0)
    area += struct.pack(">HHHHI", 0x0010, 0x0016, 0x000B, 2048, 0)  # RSAPSS SHA-256, e=65537
    area += struct.pack(">H", 256) + modulus
    return struct.pack(">H", len(area)) + area


def _rsa_pss_sign(key: rsa.RSAPrivateKey, data: bytes) -> bytes:
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    return struct.pack(">HHH", 0x0016, 0x000B, 256) + key.sign(data, pss, hashes.SHA256())


@pytest.fixture(scope="module")
def software_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# --- real quotes -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def genuine(tpm: TpmClient, ak: AttestationKey) -> tuple[Quote, QuoteCheckResult]:
    nonce = os.urandom(32)
    quote = tpm.quote(ak, SELECTION, nonce)
    result = verify_quote(
        ak.public, quote.attest, quote.signature, quote.pcrs, nonce, SELECTION, None
    )
    return quote, result


def _verify(ak: AttestationKey, evidence: Quote, /, **changes: object) -> QuoteCheckResult:
    """verify_quote of ``evidence`` as the node sent it, with ``changes`` applied."""
    arguments: dict[str, object] = {
        "ak_public": ak.public,
        "quote": evidence.attest,
        "signature": evidence.signature,
        "pcrs": evidence.pcrs,
        "expected_nonce": evidence.nonce,
        "expected_selection": SELECTION,
        "previous": None,
    }
    arguments.update(changes)
    return verify_quote(**arguments)  # type: ignore[arg-type]


def _resign(key: ec.EllipticCurvePrivateKey, attest: bytes) -> tuple[bytes, bytes, bytes]:
    return _ecc_public(key), attest, _ecdsa_sign(key, attest)


def test_genuine_quote_verifies(
    ak: AttestationKey, genuine: tuple[Quote, QuoteCheckResult]
) -> None:
    quote, result = genuine
    assert result.ok, result.failures
    assert {f.reason for f in result.unchecked} == {Reason.CLOCK_NOT_CHECKED}
    assert result.attest is not None
    assert result.attest.extra_data == quote.nonce
    assert result.attest.quote_info is not None
    assert result.attest.quote_info.selection_dict() == SELECTION
    assert result.clock_state is not None
    assert result.clock_state.ak_name == ak.name
    assert result.clock_state.clock == result.attest.clock_info.clock
    result.raise_for_failures()


def test_later_quote_verifies_against_the_earlier_clock_state(
    tpm: TpmClient, ak: AttestationKey, genuine: tuple[Quote, QuoteCheckResult]
) -> None:
    _, first = genuine
    assert first.clock_state is not None
    # TPM Clock counts milliseconds: give it one to move on (this waits, it asserts no time).
    time.sleep(0.01)
    later = tpm.quote(ak, SELECTION, b"later")
    result = _verify(ak, later, previous=first.clock_state)
    assert result.ok, result.failures
    assert result.unchecked == ()


def test_no_nonce_means_freshness_not_checked(
    ak: AttestationKey, genuine: tuple[Quote, QuoteCheckResult]
) -> None:
    quote, _ = genuine
    result = _verify(ak, quote, expected_nonce=None)
    assert result.ok
    assert Reason.FRESHNESS_NOT_CHECKED in {f.reason for f in result.unchecked}


def test_wrong_nonce(ak: AttestationKey, genuine: tuple[Quote, QuoteCheckResult]) -> None:
    quote, _ = genuine
    assert _verify(ak, quote, expected_nonce=os.urandom(32)).reasons == {Reason.NONCE_MISMATCH}


def test_replayed_quote(ak: AttestationKey, genuine: tuple[Quote, QuoteCheckResult]) -> None:
    quote, first = genuine
    assert first.clock_state is not None
    same = _verify(ak, quote, previous=first.clock_state)
    assert same.reasons == {Reason.CLOCK_NOT_ADVANCED}
    newer = dataclasses.replace(first.clock_state, clock=first.clock_state.clock + 60_000)
    assert _verify(ak, quote, previous=newer).reasons == {Reason.CLOCK_NOT_ADVANCED}


def test_counters_rolled_back(ak: AttestationKey, genuine: tuple[Quote, QuoteCheckResult]) -> None:
    quote, first = genuine
    state = first.clock_state
    assert state is not None
    reset_ahead = dataclasses.replace(state, reset_count=state.reset_count + 1, clock=0)
    assert _verify(ak, quote, previous=reset_ahead).reasons == {Reason.RESET_COUNT_ROLLED_BACK}
    restart_ahead = dataclasses.replace(state, restart_count=state.restart_count + 1, clock=0)
    assert _verify(ak, quote, previous=restart_ahead).reasons == {Reason.RESTART_COUNT_ROLLED_BACK}
    # A reset since the previous quote is fine, but Clock may not go back while `safe` is set.
    before_reset = dataclasses.replace(state, reset_count=state.reset_count - 1, clock=0)
    assert _verify(ak, quote, previous=before_reset).ok
    clock_ahead = dataclasses.replace(
        state, reset_count=state.reset_count - 1, clock=state.clock + 10**9
    )
    assert _verify(ak, quote, previous=clock_ahead).reasons == {Reason.CLOCK_WENT_BACKWARDS}


def test_clock_state_of_another_ak(
    ak: AttestationKey, genuine: tuple[Quote, QuoteCheckResult]
) -> None:
    quote, first = genuine
    assert first.clock_state is not None
    other = dataclasses.replace(first.clock_state, ak_name=b"\x00\x0b" + bytes(32))
    assert _verify(ak, quote, previous=other).reasons == {Reason.CLOCK_STATE_OTHER_AK}


def test_narrowed_selection(tpm: TpmClient, ak: AttestationKey) -> None:
    narrow = {"sha256": list(range(8))}
    quote = tpm.quote(ak, narrow, b"narrow")
    # The node quotes fewer PCRs than asked for and sends only the quoted values.
    assert _verify(ak, quote).reasons == {Reason.SELECTION_MISMATCH}
    # CVE-2024-29039 shape: it also sends values for PCRs the quote does not cover.
    full_values = tpm.read_pcrs(SELECTION)
    assert _verify(ak, quote, pcrs=full_values).reasons == {
        Reason.SELECTION_MISMATCH,
        Reason.PCR_VALUES_INVALID,
    }
    # The check is equality: a wider quote than asked for also fails.
    assert _verify(ak, quote, expected_selection={"sha256": [0, 1]}).reasons == {
        Reason.SELECTION_MISMATCH
    }
    assert _verify(ak, quote, expected_selection=narrow).ok


def test_pcr_value_changed(ak: AttestationKey, genuine: tuple[Quote, QuoteCheckResult]) -> None:
    quote, _ = genuine
    changed = {bank: dict(values) for bank, values in quote.pcrs.items()}
    changed["sha256"][7] = bytes(a ^ 1 for a in changed["sha256"][7])
    assert _verify(ak, quote, pcrs=changed).reasons == {Reason.PCR_DIGEST_MISMATCH}
    missing = {bank: dict(values) for bank, values in quote.pcrs.items()}
    del missing["sha1"][0]
    assert _verify(ak, quote, pcrs=missing).reasons == {Reason.PCR_VALUES_INVALID}
    short = {bank: dict(values) for bank, values in quote.pcrs.items()}
    short["sha1"][0] = b"\x00" * 19
    assert _verify(ak, quote, pcrs=short).reasons == {Reason.PCR_VALUES_INVALID}


def test_signature_from_another_key(tpm: TpmClient, ak: AttestationKey) -> None:
    other = tpm.create_attestation_key(ak.algorithm)
    try:
        quote = tpm.quote(other, SELECTION, b"other key")
    finally:
        tpm.flush_attestation_key(other)
    assert _verify(ak, quote).reasons == {Reason.SIGNATURE_INVALID}
    assert _verify(other, quote).ok


def test_signature_of_the_wrong_type(
    ak: AttestationKey,
    genuine: tuple[Quote, QuoteCheckResult],
    software_key: ec.EllipticCurvePrivateKey,
) -> None:
    quote, _ = genuine
    rsa_key = rsa.generate_private_key(65537, 2048)
    foreign = (
        _rsa_pss_sign(rsa_key, quote.attest)
        if ak.algorithm == "ecc-p256"
        else _ecdsa_sign(software_key, quote.attest)
    )
    assert _verify(ak, quote, signature=foreign).reasons == {Reason.SIGNATURE_SCHEME_MISMATCH}


@pytest.mark.parametrize(
    ("offset", "value", "reason"),
    [(0, b"\xff\x54\x43\x46", Reason.MAGIC_INVALID), (4, b"\x80\x17", Reason.TYPE_NOT_QUOTE)],
    ids=["magic", "type"],
)
def test_magic_and_type_corruption(
    ak: AttestationKey,
    genuine: tuple[Quote, QuoteCheckResult],
    software_key: ec.EllipticCurvePrivateKey,
    offset: int,
    value: bytes,
    reason: Reason,
) -> None:
    quote, _ = genuine
    corrupted = quote.attest[:offset] + value + quote.attest[offset + len(value) :]
    # As received: the field check fails, and so does the signature.
    assert _verify(ak, quote, quote=corrupted).reasons == {reason, Reason.SIGNATURE_INVALID}
    # Validly signed (as a non-restricted key could): the field check alone catches it.
    public, attest, signature = _resign(software_key, corrupted)
    result = _verify(ak, quote, ak_public=public, quote=attest, signature=signature)
    assert result.reasons == {reason}


def test_every_failure_is_reported_at_once(
    ak: AttestationKey, genuine: tuple[Quote, QuoteCheckResult]
) -> None:
    quote, first = genuine
    assert first.clock_state is not None
    changed = {bank: dict(values) for bank, values in quote.pcrs.items()}
    changed["sha256"][0] = b"\x5a" * 32
    corrupted = b"\x00\x00\x00\x00" + quote.attest[4:]
    result = _verify(
        ak,
        quote,
        quote=corrupted,
        pcrs=changed,
        expected_nonce=b"another nonce",
        expected_selection={"sha256": list(range(24))},
        previous=dataclasses.replace(first.clock_state, reset_count=99),
    )
    assert result.reasons == {
        Reason.SIGNATURE_INVALID,
        Reason.MAGIC_INVALID,
        Reason.NONCE_MISMATCH,
        Reason.SELECTION_MISMATCH,
        Reason.PCR_DIGEST_MISMATCH,
        Reason.RESET_COUNT_ROLLED_BACK,
    }
    with pytest.raises(QuoteError, match="6 failures") as raised:
        result.raise_for_failures()
    for reason in result.reasons:
        assert str(reason) in str(raised.value)


def test_malformed_evidence_is_reported_not_raised(
    ak: AttestationKey, genuine: tuple[Quote, QuoteCheckResult]
) -> None:
    quote, _ = genuine
    assert _verify(ak, quote, quote=quote.attest[:-1]).reasons == {
        Reason.QUOTE_MALFORMED,
        Reason.SIGNATURE_INVALID,
    }
    assert _verify(ak, quote, signature=quote.signature + b"\x00").reasons == {
        Reason.SIGNATURE_MALFORMED
    }
    assert _verify(ak, quote, ak_public=b"\x00\x01\x02").reasons == {Reason.AK_PUBLIC_MALFORMED}
    assert _verify(ak, quote, pcrs={"sha256": "not a mapping"}).reasons == {
        Reason.PCR_VALUES_INVALID
    }


def test_caller_mistakes_in_the_expected_selection_raise(
    ak: AttestationKey, genuine: tuple[Quote, QuoteCheckResult]
) -> None:
    quote, _ = genuine
    with pytest.raises(QuoteError, match="unknown PCR bank"):
        _verify(ak, quote, expected_selection={"md5": [0]})
    with pytest.raises(QuoteError, match="outside"):
        _verify(ak, quote, expected_selection={"sha256": [40]})
    with pytest.raises(QuoteError, match="empty"):
        _verify(ak, quote, expected_selection={})


def test_ak_attribute_checks(
    tpm: TpmClient,
    ak: AttestationKey,
    genuine: tuple[Quote, QuoteCheckResult],
    software_key: ec.EllipticCurvePrivateKey,
) -> None:
    assert {f.reason for f in check_ak_attributes(tpm.endorsement_key().public)} == {
        Reason.AK_NOT_SIGNING,
        Reason.AK_DECRYPT,
    }
    assert {f.reason for f in check_ak_attributes(_ecc_public(software_key, 0))} == {
        Reason.AK_NOT_RESTRICTED,
        Reason.AK_NOT_SIGNING,
        Reason.AK_NOT_FIXED_TPM,
        Reason.AK_NOT_FIXED_PARENT,
        Reason.AK_NOT_SENSITIVE_DATA_ORIGIN,
    }
    decrypting = _ecc_public(software_key, AK_ATTRIBUTES | ATTR_DECRYPT)
    assert {f.reason for f in check_ak_attributes(decrypting)} == {Reason.AK_DECRYPT}
    # A quote "signed" by an unrestricted key proves nothing, whatever it says.
    quote, _ = genuine
    unrestricted = _ecc_public(software_key, AK_ATTRIBUTES & ~ATTR_RESTRICTED)
    signature = _ecdsa_sign(software_key, quote.attest)
    result = _verify(ak, quote, ak_public=unrestricted, signature=signature)
    assert result.reasons == {Reason.AK_NOT_RESTRICTED}


def test_rsa_pss_signatures_verify(genuine: tuple[Quote, QuoteCheckResult]) -> None:
    quote, _ = genuine
    key = rsa.generate_private_key(65537, 2048)
    public = _rsa_pss_public(key)
    signature = _rsa_pss_sign(key, quote.attest)
    result = verify_quote(public, quote.attest, signature, quote.pcrs, quote.nonce, SELECTION, None)
    assert result.ok, result.failures
    forged = _rsa_pss_sign(rsa.generate_private_key(65537, 2048), quote.attest)
    result = verify_quote(public, quote.attest, forged, quote.pcrs, quote.nonce, SELECTION, None)
    assert result.reasons == {Reason.SIGNATURE_INVALID}


def test_decoded_quote_fields(genuine: tuple[Quote, QuoteCheckResult]) -> None:
    quote, _ = genuine
    attest = decode_attest(quote.attest)
    assert attest.magic == 0xFF544347
    assert attest.type == 0x8018
    assert attest.clock_info.safe
    assert attest.clock_info.reset_count >= 1
    assert len(attest.qualified_signer) == 34  # SHA-256 qualified name
