"""The node's TLS key, CSR and certificate files under ``[link] cert_dir``.

The key is ECDSA P-256, made on the node, 0600, and never sent anywhere: enrollment and renewal
send a CSR. Files: ``node.key`` (0600), ``node.pem`` (the certificate), ``ca.pem`` (the
controller CA pinned at enrollment), ``command-key.pem`` (the controller's Ed25519 command key)
and ``enrollment.json`` (what was enrolled, for people). All are 0600: only the agent reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.errors import IdentityError, LinkProtocolError
from agent.identity.files import read_private, write_private
from agent.identity.spiffe import check_node_id, node_id_of

# Renew at two thirds of the certificate's life: the old one stays valid until it expires, so a
# renewal that fails leaves a third of the lifetime to retry.
RENEW_AT_FRACTION = 2 / 3


@dataclass(frozen=True)
class IdentityPaths:
    cert_dir: Path
    ca_override: Path | None = None

    @property
    def key(self) -> Path:
        return self.cert_dir / "node.key"

    @property
    def certificate(self) -> Path:
        return self.cert_dir / "node.pem"

    @property
    def ca(self) -> Path:
        return self.ca_override or self.cert_dir / "ca.pem"

    @property
    def command_key(self) -> Path:
        return self.cert_dir / "command-key.pem"

    @property
    def enrollment(self) -> Path:
        return self.cert_dir / "enrollment.json"


def create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return key


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    data = read_private(path, "node TLS key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise IdentityError(f"node TLS key {path} is not a PEM private key: {error}") from error
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"node TLS key {path} is not an ECDSA key")
    return key


def make_csr(key: ec.EllipticCurvePrivateKey, node_id: str) -> bytes:
    """A CSR (DER) naming the node in its subject CN; the controller decides the SPIFFE id."""
    check_node_id(node_id)
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.DER)


def load_certificate_der(data: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError as error:
        raise LinkProtocolError(f"{what} is not a DER certificate: {error}") from None


def check_issued_certificate(
    certificate: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    node_id: str,
) -> None:
    """What the node checks in a certificate the controller returns: for its own key, its own
    node id, and signed by the pinned CA."""
    if certificate.public_key() != key.public_key():
        raise LinkProtocolError("the controller returned a certificate for another key")
    named = node_id_of(certificate)
    if named != node_id:
        raise LinkProtocolError(f"the controller returned a certificate for node {named!r}")
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as error:
        raise LinkProtocolError(
            f"the returned certificate is not signed by the CA: {error}"
        ) from None
    except InvalidSignature as error:
        raise LinkProtocolError(
            f"the returned certificate's signature is invalid: {error}"
        ) from None


def certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def store_certificate(paths: IdentityPaths, certificate: x509.Certificate) -> None:
    write_private(paths.certificate, certificate_pem(certificate))


def store_enrollment(
    paths: IdentityPaths,
    *,
    certificate: x509.Certificate,
    ca: x509.Certificate,
    command_key_pem: str,
    details: dict[str, object],
) -> None:
    write_private(paths.ca, certificate_pem(ca))
    write_private(paths.command_key, command_key_pem.encode("ascii"))
    store_certificate(paths, certificate)
    write_private(paths.enrollment, (json.dumps(details, indent=2, sort_keys=True) + "\n").encode())


@dataclass(frozen=True)
class LoadedIdentity:
    node_id: str
    key_pem: bytes
    certificate_pem: bytes
    ca_pem: bytes
    not_before: float
    not_after: float

    @property
    def renew_at(self) -> float:
        return self.not_before + RENEW_AT_FRACTION * (self.not_after - self.not_before)


def load_identity(paths: IdentityPaths) -> LoadedIdentity:
    """The files the link dials with, checked to belong together."""
    key = load_key(paths.key)
    certificate_data = read_private(paths.certificate, "node certificate")
    ca_data = read_private(paths.ca, "controller CA")
    try:
        certificate = x509.load_pem_x509_certificate(certificate_data)
        ca = x509.load_pem_x509_certificate(ca_data)
    except ValueError as error:
        raise IdentityError(
            f"node certificate or CA in {paths.cert_dir} unreadable: {error}"
        ) from error
    if certificate.public_key() != key.public_key():
        raise IdentityError(f"{paths.certificate} is not the certificate of {paths.key}: re-enroll")
    try:
        node_id = node_id_of(certificate)
    except LinkProtocolError as error:
        raise IdentityError(f"{paths.certificate}: {error}") from error
    return LoadedIdentity(
        node_id=node_id,
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        certificate_pem=certificate_data,
        ca_pem=ca.public_bytes(serialization.Encoding.PEM),
        not_before=certificate.not_valid_before_utc.replace(tzinfo=UTC).timestamp(),
        not_after=certificate.not_valid_after_utc.replace(tzinfo=UTC).timestamp(),
    )
