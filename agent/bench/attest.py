"""``accelguard bench attest``: verifier throughput, each beside hashlib on the same bytes.

Everything is synthetic and in memory, so the bench runs on any machine (no TPM, no
securityfs): a crypto-agile event log, an ``ima-ng`` binary measurement list, and TPM quotes
signed by a software P-256 key shaped like an AK. The baseline of each measurement is hashing
the same bytes with hashlib in the same run; the ratio (our time / baseline time) is the
number to compare across machines.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Any, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from agent.attest.logs import ima
from agent.attest.logs.eventlog import parse_event_log
from agent.attest.tpm.algorithms import (
    ALG_ECC,
    ALG_ECDSA,
    ALG_NULL,
    ALG_SHA1,
    ALG_SHA256,
    ECC_NIST_P256,
)
from agent.attest.tpm.checks import AK_ATTRIBUTES, verify_quote
from agent.attest.tpm.wire import TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE, compute_name
from agent.bench.common import interleaved_medians, median_seconds

_MIB: Final = 1024 * 1024
_EV_NO_ACTION: Final = 0x00000003
_EV_EFI_BOOT_SERVICES_APPLICATION: Final = 0x80000003
_QUOTED_PCRS: Final = list(range(24))


# --- synthetic inputs ---------------------------------------------------------------------------


def synthetic_event_log(size: int) -> bytes:
    """A crypto-agile log (SHA-1 and SHA-256) of about ``size`` bytes of boot-application-like
    events spread over PCRs 0-7."""
    spec_id = (
        b"Spec ID Event03\x00"
        + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, 2)
        + struct.pack("<HH", ALG_SHA1, 20)
        + struct.pack("<HH", ALG_SHA256, 32)
        + b"\x00"
    )
    parts = [struct.pack("<II", 0, _EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(spec_id))]
    parts.append(spec_id)
    total = sum(len(part) for part in parts)
    index = 0
    while total < size:
        data = (b"event %08d " % index) * 16
        event = (
            struct.pack("<III", index % 8, _EV_EFI_BOOT_SERVICES_APPLICATION, 2)
            + struct.pack("<H", ALG_SHA1)
            + hashlib.sha1(data).digest()  # noqa: S324 - the SHA-1 PCR bank, not a security use
            + struct.pack("<H", ALG_SHA256)
            + hashlib.sha256(data).digest()
            + struct.pack("<I", len(data))
            + data
        )
        parts.append(event)
        total += len(event)
        index += 1
    return b"".join(parts)


def synthetic_ima_list(entries: int) -> bytes:
    """A binary ``ima-ng`` list of ``entries`` measurements into PCR 10 (the kernel's layout:
    see agent/attest/logs/ima.py)."""
    parts = []
    for index in range(entries):
        digest = hashlib.sha256(b"file %d" % index).digest()
        name = b"/usr/lib/bench/file-%07d.so\x00" % index
        digest_field = b"sha256:\x00" + digest
        data = (
            struct.pack("<I", len(digest_field))
            + digest_field
            + struct.pack("<I", len(name))
            + name
        )
        template_hash = hashlib.sha1(data).digest()  # noqa: S324 - IMA's SHA-1 template hash
        parts.append(
            struct.pack("<I", 10)
            + template_hash
            + struct.pack("<I", 6)
            + b"ima-ng"
            + struct.pack("<I", len(data))
            + data
        )
    return b"".join(parts)


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def software_quote(
    key: ec.EllipticCurvePrivateKey, nonce: bytes
) -> tuple[bytes, bytes, bytes, dict[str, dict[int, bytes]]]:
    """(ak_public, TPMS_ATTEST, TPMT_SIGNATURE, PCR values) as a TPM with this key would make
    them: a quote over sha256:0-23 (TPM 2.0 Part 2 structures, big-endian)."""
    numbers = key.public_key().public_numbers()
    area = struct.pack(">HHIH", ALG_ECC, ALG_SHA256, AK_ATTRIBUTES, 0)
    area += struct.pack(">HHHHH", ALG_NULL, ALG_ECDSA, ALG_SHA256, ECC_NIST_P256, ALG_NULL)
    area += _tpm2b(numbers.x.to_bytes(32, "big")) + _tpm2b(numbers.y.to_bytes(32, "big"))
    ak_public = _tpm2b(area)
    pcrs = {"sha256": {i: hashlib.sha256(b"pcr %d" % i).digest() for i in _QUOTED_PCRS}}
    pcr_digest = hashlib.sha256(b"".join(pcrs["sha256"][i] for i in _QUOTED_PCRS)).digest()
    attest = (
        struct.pack(">IH", TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE)
        + _tpm2b(compute_name(ak_public))
        + _tpm2b(nonce)
        + struct.pack(">QIIB", 123_456, 3, 0, 1)
        + struct.pack(">Q", 0x2023_0101)
        + struct.pack(">IHB", 1, ALG_SHA256, 3)
        + b"\xff\xff\xff"
        + _tpm2b(pcr_digest)
    )
    r, s = decode_dss_signature(key.sign(attest, ec.ECDSA(hashes.SHA256())))
    signature = (
        struct.pack(">HH", ALG_ECDSA, ALG_SHA256)
        + _tpm2b(r.to_bytes(32, "big"))
        + _tpm2b(s.to_bytes(32, "big"))
    )
    return ak_public, attest, signature, pcrs


# --- the bench ----------------------------------------------------------------------------------


def _bench_event_log(rounds: int, size: int) -> dict[str, Any]:
    data = synthetic_event_log(size)
    events = len(parse_event_log(data).events)
    megabytes = len(data) / _MIB
    ours, base = interleaved_medians(
        rounds, lambda: parse_event_log(data).replay(), lambda: hashlib.sha256(data).digest()
    )
    return {
        "what": "parse_event_log + replay (sha1, sha256) of a synthetic crypto-agile log",
        "bytes": len(data),
        "events": events,
        "seconds_per_mb": ours / megabytes,
        "mb_per_s": megabytes / ours,
        "baseline_hashlib_sha256": {
            "seconds_per_mb": base / megabytes,
            "mb_per_s": megabytes / base,
        },
        "ratio": ours / base,
    }


def _bench_ima(rounds: int, entries: int) -> dict[str, Any]:
    data = synthetic_ima_list(entries)
    per_100k = 100_000 / entries

    def parse_and_replay() -> None:
        parsed = ima.parse_ima_binary(data)
        parsed.replay("sha1")
        parsed.replay("sha256")

    ours, base = interleaved_medians(
        rounds, parse_and_replay, lambda: hashlib.sha256(data).digest()
    )
    return {
        "what": "parse_ima_binary (template hashes checked) + replay PCR 10 in sha1 and sha256",
        "entries": entries,
        "bytes": len(data),
        "seconds_per_100k_entries": ours * per_100k,
        "baseline_hashlib_sha256": {"seconds_per_100k_entries": base * per_100k},
        "ratio": ours / base,
    }


def _bench_quote(rounds: int, count: int) -> dict[str, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    nonce = os.urandom(32)
    ak_public, attest, signature, pcrs = software_quote(key, nonce)
    selection = {"sha256": _QUOTED_PCRS}
    check = verify_quote(ak_public, attest, signature, pcrs, nonce, selection, None)
    if not check.ok:  # pragma: no cover - guards the bench against measuring a failing path
        raise AssertionError(f"synthetic quote does not verify: {check.failures}")

    def verify_many() -> None:
        for _ in range(count):
            verify_quote(ak_public, attest, signature, pcrs, nonce, selection, None)

    def hash_many() -> None:
        for _ in range(count):
            hashlib.sha256(attest).digest()

    public_key = key.public_key()
    r = int.from_bytes(signature[6:38], "big")
    s = int.from_bytes(signature[40:72], "big")
    der = encode_dss_signature(r, s)

    def ecdsa_many() -> None:
        for _ in range(count):
            public_key.verify(der, attest, ec.ECDSA(hashes.SHA256()))

    ours, base = interleaved_medians(rounds, verify_many, hash_many)
    ecdsa = median_seconds(rounds, ecdsa_many)
    return {
        "what": "verify_quote of an ECDSA P-256 quote over sha256:0-23 (software-signed)",
        "quotes_per_round": count,
        "verifications_per_s": count / ours,
        "baseline_hashlib_sha256": {"hashes_per_s": count / base},
        "ratio": ours / base,
        "reference_raw_ecdsa_verify": {"verifications_per_s": count / ecdsa},
        "ratio_to_raw_ecdsa": ours / ecdsa,
    }


def bench_attest(
    rounds: int = 5, ima_entries: int = 100_000, event_log_bytes: int = _MIB, quotes: int = 200
) -> dict[str, Any]:
    return {
        "benchmark": "attest",
        "rounds": rounds,
        "note": "ratio = our seconds / hashlib seconds on the same bytes, medians of rounds",
        "event_log": _bench_event_log(rounds, event_log_bytes),
        "ima": _bench_ima(rounds, ima_entries),
        "quote_verify": _bench_quote(rounds, quotes),
    }
