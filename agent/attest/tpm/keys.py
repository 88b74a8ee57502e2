"""The node's TPM keys as values: the EK, the AK and a saved AK, and the rules that recognise them.

Pure (no tpm2-pytss, no TPM): :class:`~agent.attest.tpm.client.TpmClient` hands these out and
takes them back, and code that only carries keys around (evidence collection, the CLI) needs no
TSS to name their types. Handles and key shapes are from the TCG "Registry of Reserved TPM 2.0
Handles and Localities" and the TCG EK Credential Profile; see docs/attestation-tpm.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final

from agent.attest.tpm.algorithms import ALG_ECC, ALG_RSA, ECC_NIST_P256
from agent.attest.tpm.wire import EccParameters, RsaParameters, decode_public
from agent.errors import QuoteError, TpmError

#: TCG "Registry of Reserved TPM 2.0 Handles and Localities": RSA EK and the usual AK slot.
EK_PERSISTENT_HANDLE: Final = 0x81010001
DEFAULT_AK_HANDLE: Final = 0x81010002
#: TCG EK Credential Profile: the NV index of the RSA-2048 EK certificate.
EK_CERTIFICATE_NV_INDEX: Final = 0x01C00002
# Owner-authorised persistent objects live in 0x81000000-0x817FFFFF (Part 2 TPM2_EvictControl).
_PERSISTENT_FIRST: Final = 0x81000000
_PERSISTENT_LAST_OWNER: Final = 0x817FFFFF


class AkAlgorithm(StrEnum):
    """Key type of the attestation key; the signing scheme is always SHA-256."""

    ECC_P256 = "ecc-p256"
    RSA_2048 = "rsa-2048"


@dataclass(frozen=True)
class EndorsementKey:
    """The EK: its TPM2B_PUBLIC, its Name, and its certificate (DER) if the TPM holds one."""

    public: bytes
    name: bytes
    certificate: bytes | None
    persistent_handle: int | None


@dataclass(frozen=True)
class AttestationKeyBlob:
    """A TPM2_Create result: the AK's TPM2B_PUBLIC and TPM2B_PRIVATE (wrapped by the EK).

    The private part is only usable inside the TPM that made it, so the blob may be kept in a
    plain 0600 file and loaded again after a reboot with :meth:`TpmClient.load_attestation_key`.
    """

    public: bytes
    private: bytes

    def to_bytes(self) -> bytes:
        return self.public + self.private

    @classmethod
    def from_bytes(cls, data: bytes) -> AttestationKeyBlob:
        """Split TPM2B_PUBLIC || TPM2B_PRIVATE; TpmError if the bytes are not that."""
        if len(data) < 4:
            raise TpmError("saved attestation key is truncated: expected two TPM2B structures")
        public_size = 2 + int.from_bytes(data[:2], "big")
        private_size = 2 + int.from_bytes(data[public_size : public_size + 2], "big")
        if public_size + private_size != len(data):
            raise TpmError(
                "saved attestation key is malformed: sizes do not add up to "
                f"{len(data)} bytes; delete it and create a new AK"
            )
        return cls(data[:public_size], data[public_size:])


@dataclass(frozen=True)
class AttestationKey:
    """An AK loaded in the TPM. ``handle`` is the TPM handle (persistent 0x81... or transient)."""

    handle: int
    public: bytes
    name: bytes
    algorithm: AkAlgorithm
    persistent: bool
    blob: AttestationKeyBlob | None


def algorithm_of(public: bytes) -> AkAlgorithm | None:
    """The AK type of a TPM2B_PUBLIC, None for a key shape accelguard does not make."""
    area = decode_public(public)
    params = area.parameters
    if area.type == ALG_ECC and isinstance(params, EccParameters):
        return AkAlgorithm.ECC_P256 if params.curve_id == ECC_NIST_P256 else None
    if area.type == ALG_RSA and isinstance(params, RsaParameters):
        return AkAlgorithm.RSA_2048 if params.key_bits == 2048 else None
    return None  # pragma: no cover - decode_public only returns RSA or ECC


def same_key_template(public: bytes, template: bytes) -> bool:
    """True if two TPM2B_PUBLIC differ at most in their ``unique`` field (the key itself)."""
    try:
        a, b = decode_public(public), decode_public(template)
    except QuoteError:
        return False
    if not isinstance(a.parameters, RsaParameters) or not isinstance(b.parameters, RsaParameters):
        return False
    return (a.type, a.name_alg, a.object_attributes, a.auth_policy) == (
        b.type,
        b.name_alg,
        b.object_attributes,
        b.auth_policy,
    ) and replace(a.parameters, modulus=b"") == replace(b.parameters, modulus=b"")


def der_length(data: bytes) -> int | None:
    """Length of the DER element at the start of ``data`` (EK certificates are often padded)."""
    if len(data) < 2 or data[0] != 0x30:
        return None
    first = data[1]
    if first < 0x80:
        return 2 + first
    count = first & 0x7F
    if count == 0 or count > 4 or len(data) < 2 + count:
        return None
    return 2 + count + int.from_bytes(data[2 : 2 + count], "big")


def parse_ak_algorithm(value: str) -> AkAlgorithm:
    """``value`` as an :class:`AkAlgorithm`; TpmError naming the known ones otherwise."""
    try:
        return AkAlgorithm(value)
    except ValueError:
        known = ", ".join(a.value for a in AkAlgorithm)
        raise TpmError(f"unknown AK algorithm {value!r}: expected one of {known}") from None


def check_persistent_handle(handle: int) -> None:
    """TpmError unless ``handle`` is in the owner's persistent range."""
    if isinstance(handle, bool) or not isinstance(handle, int):
        raise TpmError(f"persistent handle must be an integer, not {handle!r}")
    if not _PERSISTENT_FIRST <= handle <= _PERSISTENT_LAST_OWNER:
        raise TpmError(
            f"persistent handle 0x{handle:08x} is outside the owner range "
            f"0x{_PERSISTENT_FIRST:08x}-0x{_PERSISTENT_LAST_OWNER:08x}"
        )
