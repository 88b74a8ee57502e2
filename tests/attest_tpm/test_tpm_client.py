"""TpmClient against a real swtpm: keys, PCRs, persistence, EK certificate."""

from __future__ import annotations

import datetime
import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.attest.tpm.checks import AK_ATTRIBUTES, Reason, check_ak_attributes, verify_quote
from agent.attest.tpm.client import TpmClient
from agent.attest.tpm.keys import (
    DEFAULT_AK_HANDLE,
    EK_CERTIFICATE_NV_INDEX,
    EK_PERSISTENT_HANDLE,
    AkAlgorithm,
    AttestationKey,
    AttestationKeyBlob,
)
from agent.attest.tpm.wire import compute_name, decode_public
from agent.errors import TpmError

ALL_PCRS = {"sha1": list(range(24)), "sha256": list(range(24))}


def _tpm2_tool(swtpm_tcti: str, *args: str) -> str:
    result = subprocess.run(
        [args[0], "-T", swtpm_tcti, *args[1:]],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, f"{args[0]} failed: {result.stderr}"
    return result.stdout


def _transient_handles(swtpm_tcti: str) -> list[str]:
    listed = yaml.safe_load(_tpm2_tool(swtpm_tcti, "tpm2_getcap", "handles-transient")) or []
    return [hex(handle) for handle in listed]


def test_ak_has_exactly_the_required_attributes(ak: AttestationKey) -> None:
    area = decode_public(ak.public)
    assert area.object_attributes == AK_ATTRIBUTES
    assert check_ak_attributes(ak.public) == ()
    assert ak.name == compute_name(ak.public)


def test_ak_signing_scheme_matches_algorithm(ak: AttestationKey) -> None:
    area = decode_public(ak.public)
    if ak.algorithm == AkAlgorithm.ECC_P256:
        assert (area.type, area.scheme, area.scheme_hash) == (0x0023, 0x0018, 0x000B)
    else:
        assert (area.type, area.scheme, area.scheme_hash) == (0x0001, 0x0014, 0x000B)


def test_pcr_read_matches_tpm2_pcrread(swtpm, tpm: TpmClient) -> None:
    tpm.extend_pcr(3, {"sha1": os.urandom(20), "sha256": os.urandom(32)})
    ours = tpm.read_pcrs(ALL_PCRS)
    theirs = yaml.safe_load(_tpm2_tool(swtpm.tcti, "tpm2_pcrread", "sha1:all+sha256:all"))
    assert set(ours) == {"sha1", "sha256"}
    for bank in ("sha1", "sha256"):
        assert sorted(ours[bank]) == list(range(24))
        expected = {
            index: int(value).to_bytes(len(ours[bank][0]), "big")
            for index, value in theirs[bank].items()
        }
        assert ours[bank] == expected
    # PCRs 17-22 start at all-ones (no H-CRTM), so a read that stopped after 8 would show.
    assert ours["sha256"][17] == b"\xff" * 32


def test_extend_then_read(tpm: TpmClient) -> None:
    before = tpm.read_pcrs({"sha1": [16], "sha256": [16]})
    sha1_event, sha256_event = os.urandom(20), os.urandom(32)
    tpm.extend_pcr(16, {"sha1": sha1_event, "sha256": sha256_event})
    after = tpm.read_pcrs({"sha1": [16], "sha256": [16]})
    assert after["sha1"][16] == hashlib.sha1(before["sha1"][16] + sha1_event).digest()  # noqa: S324
    assert after["sha256"][16] == hashlib.sha256(before["sha256"][16] + sha256_event).digest()


def test_extend_rejects_bad_input(tpm: TpmClient) -> None:
    with pytest.raises(TpmError, match="32 bytes"):
        tpm.extend_pcr(16, {"sha256": b"short"})
    with pytest.raises(TpmError, match="unknown PCR bank"):
        tpm.extend_pcr(16, {"md5": b"x" * 16})
    with pytest.raises(TpmError, match=r"outside 0\.\.23"):
        tpm.extend_pcr(24, {"sha256": b"x" * 32})
    # PCR 17 needs locality 4: the TPM refuses, and the refusal arrives as TpmError.
    with pytest.raises(TpmError, match="TPM2_PCR_Extend of PCR 17 failed"):
        tpm.extend_pcr(17, {"sha256": b"x" * 32})


def test_pcr_read_of_unimplemented_pcr_or_bank_is_a_tpm_error(tpm: TpmClient) -> None:
    with pytest.raises(TpmError, match="TPM2_PCR_Read"):
        tpm.read_pcrs({"sha256": [31]})
    with pytest.raises(TpmError, match="TPM2_PCR_Read"):
        tpm.read_pcrs({"sha3_256": [0]})
    with pytest.raises(TpmError, match="invalid PCR selection"):
        tpm.read_pcrs({"sha256": [-1]})


def test_unreachable_tpm_is_a_tpm_error(tmp_path: Path) -> None:
    with pytest.raises(TpmError, match="connecting to the TPM"):
        TpmClient(f"device:{tmp_path / 'no-such-tpm'}")


def test_quote_nonce_too_long_is_refused(tpm: TpmClient, ak: AttestationKey) -> None:
    with pytest.raises(TpmError, match="nonce"):
        tpm.quote(ak, {"sha256": [0]}, b"n" * 65)


def test_ek_matches_tpm2_createek_and_has_no_certificate_on_bare_swtpm(
    swtpm, tpm: TpmClient, tmp_path: Path
) -> None:
    ek = tpm.endorsement_key()
    assert ek.certificate is None  # plain swtpm, no swtpm_setup: nothing at 0x01C00002
    area = decode_public(ek.public)
    assert area.auth_policy.hex().startswith("837197674484b3f8")
    # tpm2-tools' tpm2_createek uses the same TCG default template: same key, same public.
    loaded_before = set(_transient_handles(swtpm.tcti))
    public_file = tmp_path / "ek.pub"
    _tpm2_tool(
        swtpm.tcti,
        "tpm2_createek",
        "-G",
        "rsa",
        "-c",
        str(tmp_path / "ek.ctx"),
        "-u",
        str(public_file),
    )
    # swtpm has no resource manager and three object slots: flush what tpm2_createek left.
    for handle in set(_transient_handles(swtpm.tcti)) - loaded_before:
        _tpm2_tool(swtpm.tcti, "tpm2_flushcontext", handle)
    assert public_file.read_bytes() == ek.public


def test_ak_blob_reloads_to_the_same_key(tpm: TpmClient) -> None:
    first = tpm.create_attestation_key(AkAlgorithm.ECC_P256)
    try:
        assert first.blob is not None
        saved = first.blob.to_bytes()
    finally:
        tpm.flush_attestation_key(first)
    again = tpm.load_attestation_key(AttestationKeyBlob.from_bytes(saved))
    try:
        assert again.name == first.name
        nonce = os.urandom(32)
        quote = tpm.quote(again, {"sha256": [0, 1]}, nonce)
        result = verify_quote(
            first.public,
            quote.attest,
            quote.signature,
            quote.pcrs,
            nonce,
            {"sha256": [0, 1]},
            None,
        )
        assert result.ok, result.failures
    finally:
        tpm.flush_attestation_key(again)


def test_malformed_ak_blobs_are_refused(tpm: TpmClient) -> None:
    with pytest.raises(TpmError, match="malformed"):
        AttestationKeyBlob.from_bytes(b"\x00\x05abc")
    ek_public = tpm.endorsement_key().public
    with pytest.raises(TpmError, match="not an AK"):
        tpm.load_attestation_key(AttestationKeyBlob(ek_public, b"\x00\x00"))


def test_persistent_ak_survives_a_tpm_reboot(fresh_swtpm) -> None:
    with TpmClient(fresh_swtpm.tcti) as client:
        assert client.attestation_key_at(DEFAULT_AK_HANDLE) is None
        created = client.ensure_attestation_key(DEFAULT_AK_HANDLE, AkAlgorithm.ECC_P256)
        assert created.persistent
        assert created.handle == DEFAULT_AK_HANDLE
        first = client.quote(created, {"sha256": [0]}, b"first")
    first_check = verify_quote(
        created.public, first.attest, first.signature, first.pcrs, b"first", {"sha256": [0]}, None
    )
    assert first_check.ok, first_check.failures

    # A reboot: swtpm restarts from its state directory and performs TPM2_Startup(CLEAR).
    fresh_swtpm.stop()
    fresh_swtpm.start()
    with TpmClient(fresh_swtpm.tcti) as client:
        reused = client.ensure_attestation_key(DEFAULT_AK_HANDLE, AkAlgorithm.ECC_P256)
        assert reused.name == created.name
        assert decode_public(reused.public).object_attributes == AK_ATTRIBUTES
        with pytest.raises(TpmError, match="is ecc-p256, not rsa-2048"):
            client.ensure_attestation_key(DEFAULT_AK_HANDLE, AkAlgorithm.RSA_2048)
        second = client.quote(reused, {"sha256": [0]}, b"second")
        second_check = verify_quote(
            reused.public,
            second.attest,
            second.signature,
            second.pcrs,
            b"second",
            {"sha256": [0]},
            first_check.clock_state,
        )
        assert second_check.ok, second_check.failures
        assert second_check.attest is not None and first_check.attest is not None
        assert (
            second_check.attest.clock_info.reset_count
            == first_check.attest.clock_info.reset_count + 1
        )
        # The pre-reboot quote, replayed after the reboot, is rejected.
        replay = verify_quote(
            reused.public,
            first.attest,
            first.signature,
            first.pcrs,
            b"first",
            {"sha256": [0]},
            second_check.clock_state,
        )
        assert replay.reasons == {Reason.RESET_COUNT_ROLLED_BACK}
        client.evict_attestation_key(DEFAULT_AK_HANDLE)
        assert client.attestation_key_at(DEFAULT_AK_HANDLE) is None


def test_a_non_ak_object_at_the_ak_handle_is_refused(fresh_swtpm, tmp_path: Path) -> None:
    _tpm2_tool(
        fresh_swtpm.tcti, "tpm2_createprimary", "-C", "o", "-c", str(tmp_path / "primary.ctx")
    )
    _tpm2_tool(
        fresh_swtpm.tcti,
        "tpm2_evictcontrol",
        "-C",
        "o",
        "-c",
        str(tmp_path / "primary.ctx"),
        hex(DEFAULT_AK_HANDLE),
    )
    with TpmClient(fresh_swtpm.tcti) as client:
        with pytest.raises(TpmError, match="is not an attestation key"):
            client.ensure_attestation_key(DEFAULT_AK_HANDLE)
        with pytest.raises(TpmError, match="outside the owner range"):
            client.attestation_key_at(0x81800000)


def _ek_certificate_for(ek_public: bytes) -> bytes:
    key = decode_public(ek_public).public_key()
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "accelguard test TPM CA")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DirectoryName(issuer)]), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.DER)


def test_ek_certificate_is_read_from_nv_and_persisted_ek_is_used(
    fresh_swtpm, tmp_path: Path
) -> None:
    with TpmClient(fresh_swtpm.tcti) as client:
        ek_public = client.endorsement_key().public
    certificate = _ek_certificate_for(ek_public)
    # Pad the index as manufacturers do, and make it longer than one TPM2_NV_Read (1024 bytes on
    # swtpm) so the chunked read and the DER trimming are both exercised.
    padded = certificate + b"\x00" * (1500 - len(certificate))
    cert_file = tmp_path / "ek.der"
    cert_file.write_bytes(padded)
    index = hex(EK_CERTIFICATE_NV_INDEX)
    # TCG EK Credential Profile attributes for the EK certificate index, written by "the
    # platform manufacturer" with platform authorisation.
    _tpm2_tool(
        fresh_swtpm.tcti,
        "tpm2_nvdefine",
        index,
        "-C",
        "p",
        "-s",
        str(len(padded)),
        "-a",
        "ppwrite|writedefine|ppread|ownerread|authread|no_da|platformcreate",
    )
    _tpm2_tool(fresh_swtpm.tcti, "tpm2_nvwrite", index, "-C", "p", "-i", str(cert_file))
    _tpm2_tool(fresh_swtpm.tcti, "tpm2_createek", "-G", "rsa", "-c", hex(EK_PERSISTENT_HANDLE))
    with TpmClient(fresh_swtpm.tcti) as client:
        ek = client.endorsement_key()
        assert ek.certificate == certificate
        assert ek.persistent_handle == EK_PERSISTENT_HANDLE
        assert ek.public == ek_public
        # The persisted EK works as the AK's parent and for activation.
        key = client.create_attestation_key()
        parsed = x509.load_der_x509_certificate(ek.certificate)
        expected_key = decode_public(ek.public).public_key()
        assert parsed.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) == expected_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        client.flush_attestation_key(key)


def test_bad_arguments_are_tpm_errors(tpm: TpmClient) -> None:
    with pytest.raises(TpmError, match="unknown AK algorithm"):
        tpm.create_attestation_key("ecc-p384")  # type: ignore[arg-type]
    with pytest.raises(TpmError, match="must be an integer"):
        tpm.attestation_key_at("0x81010002")  # type: ignore[arg-type]
