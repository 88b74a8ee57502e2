"""Judging TPM structures: is this key an acceptable AK, and does this quote verify.

Pure, like ``wire.py`` whose decoders it uses: the controller runs it on evidence from the
network. Every check reports a :class:`Finding` with a stable :class:`Reason` code instead of
raising, so a verifier sees everything wrong with a quote at once; only the caller's own
malformed arguments raise :class:`~agent.errors.QuoteError`.
"""

from __future__ import annotations

import hmac as stdlib_hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from agent.attest.tpm.algorithms import (
    ALG_ECDSA,
    ALG_NULL,
    ALG_RSA,
    ALG_RSAPSS,
    ALG_RSASSA,
    bank_name,
    cryptography_hash,
)
from agent.attest.tpm.wire import (
    ATTR_DECRYPT,
    ATTR_FIXED_PARENT,
    ATTR_FIXED_TPM,
    ATTR_RESTRICTED,
    ATTR_SENSITIVE_DATA_ORIGIN,
    ATTR_SIGN,
    ATTR_USER_WITH_AUTH,
    TPM_GENERATED_VALUE,
    TPM_ST_ATTEST_QUOTE,
    Attest,
    ClockInfo,
    EcdsaSignature,
    PublicArea,
    QuoteInfo,
    RsaSignature,
    Signature,
    decode_attest,
    decode_public,
    decode_quote_info,
    decode_signature,
    normalise_selection,
    pcr_digest,
)
from agent.errors import QuoteError

#: The attributes accelguard creates its attestation key with, and the only ones it has.
AK_ATTRIBUTES: Final = (
    ATTR_RESTRICTED
    | ATTR_SIGN
    | ATTR_FIXED_TPM
    | ATTR_FIXED_PARENT
    | ATTR_SENSITIVE_DATA_ORIGIN
    | ATTR_USER_WITH_AUTH
)


class Reason(StrEnum):
    """Why a quote or an attestation key was rejected (or what was not checked)."""

    AK_PUBLIC_MALFORMED = "ak_public_malformed"
    AK_NOT_RESTRICTED = "ak_not_restricted"
    AK_NOT_SIGNING = "ak_not_signing"
    AK_NOT_FIXED_TPM = "ak_not_fixed_tpm"
    AK_NOT_FIXED_PARENT = "ak_not_fixed_parent"
    AK_NOT_SENSITIVE_DATA_ORIGIN = "ak_not_sensitive_data_origin"
    AK_DECRYPT = "ak_can_decrypt"
    SIGNATURE_MALFORMED = "signature_malformed"
    SIGNATURE_SCHEME_MISMATCH = "signature_scheme_mismatch"
    SIGNATURE_INVALID = "signature_invalid"
    QUOTE_MALFORMED = "quote_malformed"
    MAGIC_INVALID = "magic_invalid"
    TYPE_NOT_QUOTE = "type_not_quote"
    NONCE_MISMATCH = "nonce_mismatch"
    SELECTION_MISMATCH = "pcr_selection_mismatch"
    PCR_VALUES_INVALID = "pcr_values_invalid"
    PCR_DIGEST_MISMATCH = "pcr_digest_mismatch"
    CLOCK_STATE_OTHER_AK = "clock_state_other_ak"
    CLOCK_NOT_ADVANCED = "clock_not_advanced"
    CLOCK_WENT_BACKWARDS = "clock_went_backwards"
    RESET_COUNT_ROLLED_BACK = "reset_count_rolled_back"
    RESTART_COUNT_ROLLED_BACK = "restart_count_rolled_back"
    FRESHNESS_NOT_CHECKED = "freshness_not_checked"
    CLOCK_NOT_CHECKED = "clock_not_checked"


@dataclass(frozen=True)
class Finding:
    """One failed (or skipped) check: a stable reason code and a sentence for a human."""

    reason: Reason
    message: str


_REQUIRED_AK_ATTRIBUTES: Final = (
    (ATTR_RESTRICTED, Reason.AK_NOT_RESTRICTED, "restricted is clear: it could sign forged quotes"),
    (ATTR_SIGN, Reason.AK_NOT_SIGNING, "sign is clear: it cannot sign quotes"),
    (ATTR_FIXED_TPM, Reason.AK_NOT_FIXED_TPM, "fixedTPM is clear: it could have been duplicated"),
    (
        ATTR_FIXED_PARENT,
        Reason.AK_NOT_FIXED_PARENT,
        "fixedParent is clear: it could have been duplicated",
    ),
    (
        ATTR_SENSITIVE_DATA_ORIGIN,
        Reason.AK_NOT_SENSITIVE_DATA_ORIGIN,
        "sensitiveDataOrigin is clear: its private part came from outside the TPM",
    ),
)


def _attribute_violations(area: PublicArea) -> list[Finding]:
    violations = [
        Finding(reason, f"attestation key attribute {message}")
        for bit, reason, message in _REQUIRED_AK_ATTRIBUTES
        if not area.object_attributes & bit
    ]
    if area.object_attributes & ATTR_DECRYPT:
        violations.append(
            Finding(Reason.AK_DECRYPT, "attestation key attribute decrypt is set: an AK only signs")
        )
    return violations


def check_ak_attributes(ak_public: bytes) -> tuple[Finding, ...]:
    """Every reason a TPM2B_PUBLIC is not acceptable as an AK at enrollment; empty when it is.

    An AK must be restricted (so it only signs TPM-generated data), sign, fixedTPM, fixedParent,
    sensitiveDataOrigin, and not decrypt. A malformed structure raises QuoteError.
    """
    return tuple(_attribute_violations(decode_public(ak_public)))


@dataclass(frozen=True)
class ClockState:
    """The clock of the last quote accepted from one AK, to compare the next one against."""

    ak_name: bytes
    clock: int
    reset_count: int
    restart_count: int


@dataclass(frozen=True)
class QuoteCheckResult:
    """Outcome of :func:`verify_quote`: every failed check, and the checks that were skipped.

    ``clock_state`` is the state to keep for the next quote of this AK (store it only when
    ``ok``); ``attest`` is the decoded quote when it could be decoded.
    """

    failures: tuple[Finding, ...]
    unchecked: tuple[Finding, ...]
    attest: Attest | None
    clock_state: ClockState | None

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def reasons(self) -> frozenset[Reason]:
        return frozenset(finding.reason for finding in self.failures)

    def raise_for_failures(self) -> None:
        """Raise one QuoteError naming every failure; do nothing if the quote verified."""
        if self.failures:
            details = "; ".join(f"{f.reason}: {f.message}" for f in self.failures)
            raise QuoteError(f"quote rejected ({len(self.failures)} failures): {details}")


def _verify_signature(
    ak: PublicArea, signature: Signature, quote: bytes, failures: list[Finding]
) -> None:
    expected_schemes = (ALG_RSASSA, ALG_RSAPSS) if ak.type == ALG_RSA else (ALG_ECDSA,)
    if signature.scheme not in expected_schemes or (
        ak.scheme != ALG_NULL
        and (signature.scheme != ak.scheme or signature.hash_alg != ak.scheme_hash)
    ):
        failures.append(
            Finding(
                Reason.SIGNATURE_SCHEME_MISMATCH,
                f"signature uses scheme 0x{signature.scheme:04x} with "
                f"{bank_name(signature.hash_alg)}, the AK signs with scheme 0x{ak.scheme:04x} "
                f"and {bank_name(ak.scheme_hash)}",
            )
        )
        return
    try:
        key = ak.public_key()
        digest = cryptography_hash(signature.hash_alg)
    except QuoteError as exc:
        failures.append(Finding(Reason.SIGNATURE_INVALID, f"signature cannot be verified: {exc}"))
        return
    try:
        if isinstance(signature, EcdsaSignature) and isinstance(key, ec.EllipticCurvePublicKey):
            der = encode_dss_signature(signature.r, signature.s)
            key.verify(der, quote, ec.ECDSA(digest))
        elif isinstance(signature, RsaSignature) and isinstance(key, rsa.RSAPublicKey):
            if signature.scheme == ALG_RSASSA:
                key.verify(signature.signature, quote, padding.PKCS1v15(), digest)
            else:
                # TPMs differ in the PSS salt length they use (hash length or maximum), so let
                # the verifier recover it from the signature.
                pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=padding.PSS.AUTO)
                key.verify(signature.signature, quote, pss, digest)
        else:  # pragma: no cover - the scheme check above pairs key and signature types
            failures.append(Finding(Reason.SIGNATURE_SCHEME_MISMATCH, "key/signature type differ"))
    except InvalidSignature:
        failures.append(
            Finding(
                Reason.SIGNATURE_INVALID, "signature does not verify over the quote with the AK"
            )
        )
    except (ValueError, UnsupportedAlgorithm) as exc:
        failures.append(Finding(Reason.SIGNATURE_INVALID, f"signature cannot be verified: {exc}"))


def _check_selection(
    quoted: QuoteInfo, expected: dict[int, tuple[int, ...]], failures: list[Finding]
) -> None:
    banks = [entry.hash_alg for entry in quoted.selection if entry.pcrs]
    if len(banks) != len(set(banks)):
        failures.append(
            Finding(Reason.SELECTION_MISMATCH, "quoted PCR selection lists a bank more than once")
        )
    quoted_dict = quoted.selection_dict()
    expected_dict = {bank_name(alg): list(pcrs) for alg, pcrs in expected.items()}
    if quoted_dict != expected_dict:
        # CVE-2024-29039 (tpm2-tools checkquote): a quote over fewer PCRs than were asked for
        # must not verify, or unquoted PCR values could be passed off as attested.
        failures.append(
            Finding(
                Reason.SELECTION_MISMATCH,
                f"quote covers PCRs {quoted_dict}, but {expected_dict} was asked for",
            )
        )


def _check_pcr_values(
    quoted: QuoteInfo,
    pcrs: Mapping[str, Mapping[int, bytes]],
    hash_alg: int,
    failures: list[Finding],
) -> None:
    if not isinstance(pcrs, Mapping) or not all(isinstance(v, Mapping) for v in pcrs.values()):
        failures.append(Finding(Reason.PCR_VALUES_INVALID, "PCR values are not {bank: {i: v}}"))
        return
    covered = quoted.selection_dict()
    unquoted = sorted(
        f"{bank}:{index}"
        for bank, values in pcrs.items()
        for index in values
        if index not in covered.get(bank, [])
    )
    if unquoted:
        failures.append(
            Finding(
                Reason.PCR_VALUES_INVALID,
                f"PCR values supplied that the quote does not cover: {', '.join(unquoted)}",
            )
        )
    try:
        computed = pcr_digest(quoted.selection, pcrs, hash_alg)
    except QuoteError as exc:
        failures.append(Finding(Reason.PCR_VALUES_INVALID, str(exc)))
        return
    if not stdlib_hmac.compare_digest(computed, quoted.pcr_digest):
        failures.append(
            Finding(
                Reason.PCR_DIGEST_MISMATCH,
                f"pcrDigest {quoted.pcr_digest.hex()} is not the {bank_name(hash_alg)} of the "
                f"supplied PCR values ({computed.hex()})",
            )
        )


def _check_clock(
    clock: ClockInfo, ak_name: bytes | None, previous: ClockState, failures: list[Finding]
) -> None:
    if ak_name is not None and previous.ak_name != ak_name:
        failures.append(
            Finding(
                Reason.CLOCK_STATE_OTHER_AK,
                f"previous clock state belongs to AK {previous.ak_name.hex()}, not this one",
            )
        )
        return
    # Part 1 "Timing Components": resetCount increments on every TPM Reset (reboot) and
    # restartCount on every TPM Restart/Resume and goes to zero on a Reset; neither decreases
    # short of TPM2_Clear, after which the AK must be enrolled again anyway.
    if clock.reset_count < previous.reset_count:
        failures.append(
            Finding(
                Reason.RESET_COUNT_ROLLED_BACK,
                f"resetCount {clock.reset_count} is below the {previous.reset_count} "
                "already seen from this AK",
            )
        )
        return
    if clock.reset_count == previous.reset_count:
        if clock.restart_count < previous.restart_count:
            failures.append(
                Finding(
                    Reason.RESTART_COUNT_ROLLED_BACK,
                    f"restartCount {clock.restart_count} is below the "
                    f"{previous.restart_count} already seen since the same reset",
                )
            )
            return
        if clock.restart_count == previous.restart_count and clock.clock <= previous.clock:
            failures.append(
                Finding(
                    Reason.CLOCK_NOT_ADVANCED,
                    f"clock {clock.clock} has not advanced past {previous.clock} within the same "
                    "boot: the quote is a replay or older than one already accepted",
                )
            )
        return
    # After a reset Clock carries on from its last NV copy; it may only be lower than a value
    # already reported when the TPM says so by clearing `safe` (Part 2 TPMS_CLOCK_INFO).
    if clock.clock < previous.clock and clock.safe:
        failures.append(
            Finding(
                Reason.CLOCK_WENT_BACKWARDS,
                f"clock {clock.clock} is below {previous.clock} although the TPM reports it safe",
            )
        )


def verify_quote(
    ak_public: bytes,
    quote: bytes,
    signature: bytes,
    pcrs: Mapping[str, Mapping[int, bytes]],
    expected_nonce: bytes | None,
    expected_selection: Mapping[str, Sequence[int]],
    previous: ClockState | None,
) -> QuoteCheckResult:
    """Check a quote against everything a verifier knows, and report every failed check.

    ``ak_public`` is the enrolled AK's TPM2B_PUBLIC, ``quote`` the TPMS_ATTEST bytes,
    ``signature`` the TPMT_SIGNATURE, ``pcrs`` the values the node says were quoted.
    Hostile evidence never raises: malformed parts are failures. Only a malformed
    ``expected_selection`` (the caller's own input) raises QuoteError.
    """
    expected = normalise_selection(expected_selection)
    if expected_nonce is not None and not isinstance(expected_nonce, bytes):
        raise QuoteError(
            f"expected nonce must be bytes or None, not {type(expected_nonce).__name__}"
        )
    failures: list[Finding] = []
    unchecked: list[Finding] = []

    ak: PublicArea | None = None
    ak_name: bytes | None = None
    try:
        ak = decode_public(ak_public)
        ak_name = ak.name
    except QuoteError as exc:
        failures.append(Finding(Reason.AK_PUBLIC_MALFORMED, str(exc)))
        ak = None
    if ak is not None:
        failures.extend(_attribute_violations(ak))

    decoded_signature: Signature | None = None
    try:
        decoded_signature = decode_signature(signature)
    except QuoteError as exc:
        failures.append(Finding(Reason.SIGNATURE_MALFORMED, str(exc)))

    attest: Attest | None = None
    try:
        attest = decode_attest(quote)
    except QuoteError as exc:
        failures.append(Finding(Reason.QUOTE_MALFORMED, str(exc)))

    # The signature is checked even over a quote that does not decode: it says whether the
    # malformed bytes were at least signed by this AK.
    if (
        ak is not None
        and decoded_signature is not None
        and isinstance(quote, bytes | bytearray | memoryview)
    ):
        _verify_signature(ak, decoded_signature, bytes(quote), failures)

    clock_state = None
    if attest is not None:
        if attest.magic != TPM_GENERATED_VALUE:
            failures.append(
                Finding(
                    Reason.MAGIC_INVALID,
                    f"magic is 0x{attest.magic:08x}, not TPM_GENERATED_VALUE: the TPM did not "
                    "produce this structure",
                )
            )
        quote_info = attest.quote_info
        if attest.type != TPM_ST_ATTEST_QUOTE:
            failures.append(
                Finding(
                    Reason.TYPE_NOT_QUOTE,
                    f"type is 0x{attest.type:04x}, not TPM_ST_ATTEST_QUOTE (0x8018)",
                )
            )
            # Still check what can be checked if the body has the shape of a quote.
            try:
                quote_info = decode_quote_info(attest.attested)
            except QuoteError:
                quote_info = None

        if expected_nonce is None:
            unchecked.append(
                Finding(
                    Reason.FRESHNESS_NOT_CHECKED,
                    "freshness not checked: no nonce was expected, so this quote may be a replay",
                )
            )
        elif not stdlib_hmac.compare_digest(attest.extra_data, expected_nonce):
            failures.append(
                Finding(
                    Reason.NONCE_MISMATCH,
                    f"extraData {attest.extra_data.hex()} is not the expected nonce "
                    f"{expected_nonce.hex()}",
                )
            )

        if quote_info is None:
            failures.append(Finding(Reason.QUOTE_MALFORMED, "quote body is not a TPMS_QUOTE_INFO"))
        else:
            _check_selection(quote_info, expected, failures)
            digest_alg = _digest_algorithm(ak, decoded_signature)
            if digest_alg is None:
                failures.append(
                    Finding(
                        Reason.PCR_VALUES_INVALID,
                        "pcrDigest not checked: neither the AK nor the signature names a hash",
                    )
                )
            else:
                _check_pcr_values(quote_info, pcrs, digest_alg, failures)

        if previous is None:
            unchecked.append(
                Finding(
                    Reason.CLOCK_NOT_CHECKED,
                    "clock and reset counters not checked: no earlier quote from this AK",
                )
            )
        else:
            _check_clock(attest.clock_info, ak_name, previous, failures)
        if ak_name is not None:
            clock_state = ClockState(
                ak_name,
                attest.clock_info.clock,
                attest.clock_info.reset_count,
                attest.clock_info.restart_count,
            )
    return QuoteCheckResult(tuple(failures), tuple(unchecked), attest, clock_state)


def _digest_algorithm(ak: PublicArea | None, signature: Signature | None) -> int | None:
    # Part 3 TPM2_Quote: pcrDigest uses the hash of the signing scheme, which for a restricted
    # key is fixed in its public area; fall back to the signature's when the AK has none.
    if ak is not None and ak.scheme_hash != ALG_NULL:
        return ak.scheme_hash
    if signature is not None:
        return signature.hash_alg
    return None
