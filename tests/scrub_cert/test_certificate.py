"""Issuing and verifying scrub certificates: round trip, tampering, canonical form, pinned keys."""

from __future__ import annotations

import base64
import copy
import json
from datetime import datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import ScrubError
from agent.identity.node_key import NodeKey
from agent.scrub.certificate import (
    CERTIFICATE_FORMAT,
    SIGNATURE_CONTEXT,
    canonical_json,
    coverage_text,
    issue_certificate,
    seconds_text,
    verify_certificate,
)
from agent.scrub.model import PassResult, ScrubResult
from tests.scrub_cert.support import FINISHED, STARTED, TARGET, certify, resign, scrub_result


def reparsed(document: dict[str, Any], **dumps: Any) -> Any:
    return json.loads(json.dumps(document, **dumps))


def test_round_trip_through_json(node_key: NodeKey, certificate: dict[str, Any]) -> None:
    checked = verify_certificate(reparsed(certificate), node_key.public_pem())
    assert checked.scrub_verified
    assert checked.payload == certificate["payload"]
    assert checked.public_key_pem == node_key.public_pem()
    payload = checked.payload
    assert payload["format"] == CERTIFICATE_FORMAT
    assert payload["partition_uuid"] == TARGET.partition_uuid
    assert payload["gpu_uuid"] == TARGET.gpu_uuid
    assert payload["gpu_serial"] == "1654922003456"
    assert payload["previous_lease_id"] == "lease-000241"
    assert payload["policy"] == "multi-pass"
    assert [p["pattern"] for p in payload["passes"]] == [0x55555555, 0xAAAAAAAA, 0]
    assert payload["bytes_total"] == TARGET.total_bytes
    assert payload["bytes_written"] == payload["bytes_verified"] == 10_301_210_624
    assert payload["coverage"] == "0.983974"  # 10301210624 / 10468982784, rounded down
    assert payload["started_at"] == "2025-03-14T15:09:26.535897Z"
    assert payload["finished_at"] == "2025-03-14T15:09:41.123456Z"
    assert payload["passes"][0]["write_seconds"] == "0.004512"
    assert payload["passes"][0]["verify_seconds"] == "0.003101"


def test_failed_scrub_is_a_valid_certificate_that_says_so(node_key: NodeKey) -> None:
    document = certify(node_key, scrub_result(mismatched_bytes=8))
    checked = verify_certificate(reparsed(document), node_key.public_pem())
    assert checked.scrub_verified is False
    assert checked.payload["passes"][2]["mismatched_bytes"] == 8


def test_canonical_encoding_is_exactly_as_documented() -> None:
    value = {"b": 1, "a": ["x", {"d": True, "c": 'é\n\u0001"\\/\u2028', "e": 9007199254740991}]}
    assert canonical_json(value) == (
        b'{"a":["x",{"c":"\xc3\xa9\\n\\u0001\\"\\\\/\xe2\x80\xa8","d":true,'
        b'"e":9007199254740991}],"b":1}'
    )


def test_signature_is_over_the_canonical_encoding(node_key: NodeKey) -> None:
    document = certify(node_key)
    text = canonical_json(document["payload"])
    assert json.loads(text) == document["payload"]
    public_key = node_key.public_key()
    signature = base64.b64decode(document["signature"])
    public_key.verify(signature, SIGNATURE_CONTEXT + text)


@pytest.mark.parametrize(
    "dumps",
    [
        {"indent": 4},
        {"indent": "\t", "ensure_ascii": False},
        {"separators": (" , ", " : ")},
        {"sort_keys": True},
    ],
    ids=["indented", "tabs-unicode", "spaced", "sorted"],
)
def test_reserialised_file_still_verifies(
    node_key: NodeKey, certificate: dict[str, Any], dumps: dict[str, Any]
) -> None:
    assert verify_certificate(reparsed(certificate, **dumps), node_key.public_pem())


def test_key_order_does_not_matter(node_key: NodeKey, certificate: dict[str, Any]) -> None:
    payload = dict(reversed(list(certificate["payload"].items())))
    shuffled = {"algorithm": "Ed25519", **certificate, "payload": payload}
    assert verify_certificate(shuffled, node_key.public_pem())


def _mutations(original: bytes) -> list[bytes]:
    variants = []
    for index, byte in enumerate(original):
        for replacement in {byte ^ 0x01, byte ^ 0x20, ord("0") if byte != ord("0") else ord("1")}:
            variants.append(original[:index] + bytes([replacement]) + original[index + 1 :])
    return variants


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_every_single_byte_change_is_refused_or_meaningless(
    node_key: NodeKey, certificate: dict[str, Any], ensure_ascii: bool
) -> None:
    """Flip each byte of the certificate file three ways. A flip either breaks the JSON, leaves
    the same value (a hex digit's case inside a \\u escape) and still verifies, or is refused."""
    original = json.dumps(certificate, ensure_ascii=ensure_ascii).encode()
    refused = same_value = unparsable = 0
    for variant in _mutations(original):
        try:
            document = json.loads(variant.decode("utf-8"))
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            unparsable += 1
            continue
        if document == certificate:
            verify_certificate(document, node_key.public_pem())
            same_value += 1
            continue
        with pytest.raises(ScrubError):
            verify_certificate(document, node_key.public_pem())
        refused += 1
    assert refused > len(original)
    assert unparsable > 0
    assert same_value < 40


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bytes_total", 10_468_982_785),
        ("bytes_written", 10_301_210_623),
        ("coverage", "0.983977"),
        ("verified", False),
        ("partition_uuid", "3f1c9a52-7d0e-4b8e-9a61-0c2d5e7f8a91"),
        ("gpu_serial", "1654922003457"),
        ("previous_tenant", "tenant-b"),
        ("policy", "zero"),
        ("started_at", "2025-03-14T15:09:26.535898Z"),
        ("node_id", "node-eu-west-18"),
        ("agent_version", "0.1.1"),
        ("detail", ""),
    ],
)
def test_changed_value_is_refused(
    node_key: NodeKey, certificate: dict[str, Any], field: str, value: Any
) -> None:
    document = copy.deepcopy(certificate)
    document["payload"][field] = value
    with pytest.raises(ScrubError):
        verify_certificate(document, node_key.public_pem())


def test_changed_pass_is_refused(node_key: NodeKey, certificate: dict[str, Any]) -> None:
    document = copy.deepcopy(certificate)
    document["payload"]["passes"][1]["mismatched_bytes"] = 4
    with pytest.raises(ScrubError, match=r"bad signature|verified"):
        verify_certificate(document, node_key.public_pem())


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("bytes_total", 10_468_982_784.0, "must be an integer"),
        ("bytes_total", True, "must be an integer"),
        ("bytes_total", "10468982784", "must be an integer"),
        ("bytes_total", -1, "outside"),
        ("bytes_total", 1 << 53, "outside"),
        ("coverage", 0.983976, "fixed decimal"),
        ("coverage", "0.98397600", "fixed decimal"),
        ("coverage", "00.983976", "fixed decimal"),
        ("coverage", "+0.983976", "fixed decimal"),
        ("verified", 1, "true or false"),
        ("started_at", "2025-03-14T15:09:26.535897+00:00", "RFC 3339"),
        ("started_at", "2025-03-14 15:09:26.535897Z", "RFC 3339"),
        ("started_at", "2025-02-30T15:09:26.535897Z", "not a valid time"),
        ("partition_kind", "vm", "partition_kind"),
        ("policy", "three-pass", "policy"),
        ("format", "accelguard-scrub-certificate/2", "format"),
        ("node_id", "", "must not be empty"),
        ("detail", "x" * 5000, "longer than"),
        ("detail", "\ud800", "not valid Unicode"),
        ("passes", {}, "list"),
    ],
)
def test_values_outside_the_canonical_space_are_refused_even_when_signed(
    node_key: NodeKey, certificate: dict[str, Any], field: str, value: Any, reason: str
) -> None:
    payload = copy.deepcopy(certificate["payload"])
    payload[field] = value
    try:
        document = resign(node_key, payload)
    except ScrubError:
        return  # not even encodable (a lone surrogate): nobody can sign it
    with pytest.raises(ScrubError, match=reason):
        verify_certificate(document, node_key.public_pem())


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda p: p.update(verified=False), "verified is false but the passes say true"),
        (lambda p: p.update(coverage="0.990000"), "rounded down"),
        (lambda p: p.update(bytes_written=1), "smallest pass's bytes_written"),
        (lambda p: p.update(bytes_verified=1), "smallest pass's bytes_verified"),
        (lambda p: p["passes"].reverse(), "not policy"),
        (lambda p: p.update(finished_at="2025-03-14T15:09:26.535896Z"), "before"),
        (lambda p: p.update(extra=1), "unknown fields extra"),
        (lambda p: p.pop("gpu_serial"), "lacks gpu_serial"),
        (lambda p: p["passes"][0].pop("pattern"), r"passes\[0\] lacks pattern"),
        (lambda p: p["passes"][0].update(pattern=1 << 32), "outside"),
    ],
)
def test_inconsistent_payload_is_refused_even_when_signed(
    node_key: NodeKey, certificate: dict[str, Any], change: Any, reason: str
) -> None:
    payload = copy.deepcopy(certificate["payload"])
    change(payload)
    with pytest.raises(ScrubError, match=reason):
        verify_certificate(resign(node_key, payload), node_key.public_pem())


def test_wrong_trusted_key_is_refused(certificate: dict[str, Any]) -> None:
    other = NodeKey.generate()
    with pytest.raises(ScrubError, match="not the trusted node key"):
        verify_certificate(certificate, other.public_pem())


def test_certificate_resigned_by_another_key_is_refused(
    node_key: NodeKey, certificate: dict[str, Any]
) -> None:
    """The forgery of issue 8: a failed scrub's payload flipped to verified and re-signed with the
    forger's key, which it embeds. Internally consistent, so only the trusted key catches it."""
    failed = certify(node_key, scrub_result(mismatched_bytes=8))
    payload = copy.deepcopy(failed["payload"])
    payload["passes"][2]["mismatched_bytes"] = 0
    payload["verified"] = True
    forged = resign(NodeKey.generate(), payload)
    assert forged["public_key"] != node_key.public_pem()
    with pytest.raises(ScrubError, match="not the trusted node key"):
        verify_certificate(reparsed(forged), node_key.public_pem())
    # Trusting the embedded key is the only way it passes -- what verification no longer offers.
    assert verify_certificate(reparsed(forged), forged["public_key"]).scrub_verified


def test_a_trusted_key_is_required(certificate: dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        verify_certificate(certificate)  # type: ignore[call-arg]


def test_embedded_key_swapped_without_resigning_is_refused(certificate: dict[str, Any]) -> None:
    swapped = NodeKey.generate().public_pem()
    document = dict(certificate, public_key=swapped)
    with pytest.raises(ScrubError, match="bad signature"):
        verify_certificate(document, swapped)


@pytest.mark.parametrize(
    "pem",
    ["", "not a key", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "é" * 10],
)
def test_malformed_trusted_key_is_refused(certificate: dict[str, Any], pem: str) -> None:
    with pytest.raises(ScrubError, match="trusted public key"):
        verify_certificate(certificate, pem)


def test_non_ed25519_key_is_refused(node_key: NodeKey, certificate: dict[str, Any]) -> None:
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(ScrubError, match="not an Ed25519 key"):
        verify_certificate(dict(certificate, public_key=pem), node_key.public_pem())
    with pytest.raises(ScrubError, match="not an Ed25519 key"):
        verify_certificate(certificate, pem)


def test_non_canonical_base64_signature_is_refused(
    node_key: NodeKey, certificate: dict[str, Any]
) -> None:
    """64 bytes in base64 end with a digit whose low 4 bits are padding: flipping them decodes
    to the same, valid signature, and must still be refused."""
    signature = certificate["signature"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(signature[-3])
    twin = signature[:-3] + alphabet[last ^ 0x01] + "=="
    assert base64.b64decode(twin) == base64.b64decode(signature)
    with pytest.raises(ScrubError, match="canonical base64"):
        verify_certificate(dict(certificate, signature=twin), node_key.public_pem())


@pytest.mark.parametrize("signature", ["", "A" * 88, "!" * 86 + "==", "QQ==", 12, None], ids=repr)
def test_malformed_signature_is_refused(
    node_key: NodeKey, certificate: dict[str, Any], signature: Any
) -> None:
    with pytest.raises(ScrubError, match="signature"):
        verify_certificate(dict(certificate, signature=signature), node_key.public_pem())


def test_non_canonical_pem_is_refused(node_key: NodeKey, certificate: dict[str, Any]) -> None:
    crlf = certificate["public_key"].replace("\n", "\r\n")
    with pytest.raises(ScrubError, match="canonical PEM"):
        verify_certificate(dict(certificate, public_key=crlf), node_key.public_pem())


@pytest.mark.parametrize(
    "document",
    [
        [],
        "certificate",
        {"payload": {}},
        {"payload": {}, "signature": "", "public_key": "", "algorithm": "Ed25519", "x": 1},
    ],
    ids=repr,
)
def test_wrong_document_shape_is_refused(node_key: NodeKey, document: Any) -> None:
    with pytest.raises(ScrubError, match="certificate"):
        verify_certificate(document, node_key.public_pem())


def test_other_algorithm_is_refused(node_key: NodeKey, certificate: dict[str, Any]) -> None:
    with pytest.raises(ScrubError, match="unsupported signature algorithm"):
        verify_certificate(dict(certificate, algorithm="RS256"), node_key.public_pem())


def test_issue_refuses_naive_times(node_key: NodeKey) -> None:
    with pytest.raises(ScrubError, match="no time zone"):
        issue_certificate(
            node_key,
            node_id="n",
            target=TARGET,
            gpu_serial="s",
            previous_lease_id="",
            previous_tenant="",
            result=scrub_result(),
            started_at=datetime(2025, 1, 1),  # naive: no tzinfo
            finished_at=FINISHED,
        )


def test_issue_refuses_what_verification_would_refuse(node_key: NodeKey) -> None:
    wrong_patterns = ScrubResult(
        backend="cuda",
        policy="zero",
        total_bytes=100,
        passes=(PassResult(0x55555555, 96, 96, 0.1, 0.1, 0),),
    )
    with pytest.raises(ScrubError, match="not policy 'zero'"):
        certify(node_key, wrong_patterns)
    backwards = {"started_at": FINISHED, "finished_at": STARTED}
    with pytest.raises(ScrubError, match="before"):
        issue_certificate(
            node_key,
            node_id="n",
            target=TARGET,
            gpu_serial="s",
            previous_lease_id="",
            previous_tenant="",
            result=scrub_result(),
            **backwards,
        )


def test_first_scrub_has_no_previous_lease(node_key: NodeKey) -> None:
    document = issue_certificate(
        node_key,
        node_id="n",
        target=TARGET,
        gpu_serial="",
        previous_lease_id="",
        previous_tenant="",
        result=scrub_result(policy="zero"),
        started_at=STARTED,
        finished_at=STARTED + timedelta(seconds=1),
    )
    assert verify_certificate(reparsed(document), node_key.public_pem()).scrub_verified


def test_empty_scrub_certifies_nothing(node_key: NodeKey) -> None:
    empty = ScrubResult(backend="cuda", policy="zero", total_bytes=TARGET.total_bytes)
    checked = verify_certificate(reparsed(certify(node_key, empty)), node_key.public_pem())
    assert checked.scrub_verified is False
    assert checked.payload["coverage"] == "0.000000"


@pytest.mark.parametrize(
    ("verified", "total", "text"),
    [
        (0, 0, "0.000000"),
        (0, 10, "0.000000"),
        (10, 10, "1.000000"),
        (11, 10, "1.000000"),
        (999_999_999, 1_000_000_000, "0.999999"),
        (2, 3, "0.666666"),
    ],
)
def test_coverage_is_rounded_down(verified: int, total: int, text: str) -> None:
    assert coverage_text(verified, total) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0.000000"), (1.0000005, "1.000000"), (1.0000015, "1.000002"), (12.5, "12.500000")],
)
def test_durations_are_fixed_decimals(seconds: float, text: str) -> None:
    assert seconds_text(seconds) == text


@pytest.mark.parametrize("seconds", [-1.0, float("nan"), float("inf"), 1e300])
def test_impossible_durations_are_refused(seconds: float) -> None:
    with pytest.raises(ScrubError):
        seconds_text(seconds)


def test_long_detail_is_cut_not_refused(node_key: NodeKey) -> None:
    result = scrub_result()
    long = ScrubResult(result.backend, result.policy, result.total_bytes, result.passes, "x" * 9000)
    checked = verify_certificate(reparsed(certify(node_key, long)), node_key.public_pem())
    assert checked.payload["detail"] == "x" * 4096
