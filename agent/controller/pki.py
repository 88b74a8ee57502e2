"""The controller's PKI: a CA (ECDSA P-256), the server certificate it signs, and a separate
Ed25519 key for signing commands (next issue), all in one directory, every file 0600.

Node certificates are short-lived (24 h by default) and name the node only in their URI SAN
``spiffe://<trust-domain>/node/<id>``; that SAN is the node's identity on the link.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import EnrollmentRefusedError, IdentityError, PkiError
from agent.identity.files import read_private, write_private
from agent.identity.spiffe import check_node_id, spiffe_id

CA_LIFETIME: Final = datetime.timedelta(days=3650)
SERVER_LIFETIME: Final = datetime.timedelta(days=825)
# Accept a node certificate a little before its issue time: node clocks drift.
CLOCK_SKEW: Final = datetime.timedelta(minutes=5)
FILES: Final = ("ca.key", "ca.pem", "server.key", "server.pem", "command.key", "command.pub")


def _private_pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _san_entries(names: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def init_pki(directory: Path, trust_domain: str, server_names: list[str]) -> str:
    """Create the CA, the server certificate and the command key; the CA's SHA-256 fingerprint
    (what `accelguard enroll --ca-fingerprint` pins). Refuses to overwrite an existing PKI."""
    existing = [name for name in FILES if (directory / name).exists()]
    if existing:
        raise PkiError(
            f"{directory} already holds a controller PKI ({', '.join(existing)}); "
            "refusing to replace it (every enrolled node trusts this CA)"
        )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = _now()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "accelguard"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"accelguard controller CA {trust_domain}"),
        ]
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + SERVER_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(_san_entries(server_names)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    command_key = Ed25519PrivateKey.generate()
    write_private(directory / "ca.key", _private_pem(ca_key))
    write_private(directory / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    write_private(directory / "server.key", _private_pem(server_key))
    # The chain carries the CA: `accelguard enroll` reads it from the handshake and pins it by
    # its fingerprint.
    write_private(
        directory / "server.pem",
        server.public_bytes(serialization.Encoding.PEM)
        + ca.public_bytes(serialization.Encoding.PEM),
    )
    write_private(directory / "command.key", _private_pem(command_key))
    write_private(
        directory / "command.pub",
        command_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    return fingerprint(ca)


def fingerprint(certificate: x509.Certificate) -> str:
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


@dataclass(frozen=True)
class IssuedCertificate:
    certificate: x509.Certificate
    der: bytes
    serial: str
    not_after: float
    spiffe_id: str


class ControllerPki:
    """The loaded PKI: signs node certificates, serves the server key pair."""

    def __init__(self, directory: Path, trust_domain: str) -> None:
        self.directory = directory
        self.trust_domain = trust_domain
        try:
            self._ca_key = serialization.load_pem_private_key(
                read_private(directory / "ca.key", "controller CA key"), password=None
            )
            self.ca = x509.load_pem_x509_certificate(read_private(directory / "ca.pem", "CA"))
            self.server_key_pem = read_private(directory / "server.key", "server key")
            self.server_chain_pem = read_private(directory / "server.pem", "server certificate")
            self.command_public_pem = read_private(directory / "command.pub", "command key")
            command_key = serialization.load_pem_private_key(
                read_private(directory / "command.key", "command key"), password=None
            )
        except (IdentityError, ValueError, UnsupportedAlgorithm) as error:
            raise PkiError(
                f"controller PKI in {directory} is unusable: {error} "
                "(create one with `accelguard controller init --dir DIR`)"
            ) from error
        if not isinstance(self._ca_key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{directory / 'ca.key'} is not an ECDSA key")
        if not isinstance(command_key, Ed25519PrivateKey):
            raise PkiError(f"{directory / 'command.key'} is not an Ed25519 key")
        # Signs remote commands (agent/link/envelope.py); never leaves this process. The key
        # before the last rotation is kept for the nodes that have not confirmed the new one.
        self.command_key = command_key
        self.previous_command_key: Ed25519PrivateKey | None = None
        previous = directory / "command-previous.key"
        if previous.exists():
            try:
                loaded = serialization.load_pem_private_key(
                    read_private(previous, "previous command key"), password=None
                )
            except (IdentityError, ValueError, UnsupportedAlgorithm) as error:
                raise PkiError(f"{previous} is unusable: {error}") from error
            if not isinstance(loaded, Ed25519PrivateKey):
                raise PkiError(f"{previous} is not an Ed25519 key")
            self.previous_command_key = loaded
        self.ca_pem = self.ca.public_bytes(serialization.Encoding.PEM)
        self.ca_key = self._ca_key
        self.ca_der = self.ca.public_bytes(serialization.Encoding.DER)
        self.fingerprint = fingerprint(self.ca)

    def rotate_command_key(self) -> Ed25519PrivateKey:
        """Make a new command key the current one; the current one becomes the previous (the
        one before is forgotten). Files are replaced atomically, the previous first."""
        new = Ed25519PrivateKey.generate()
        write_private(self.directory / "command-previous.key", _private_pem(self.command_key))
        public = new.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        write_private(self.directory / "command.key", _private_pem(new))
        write_private(self.directory / "command.pub", public)
        self.previous_command_key, self.command_key = self.command_key, new
        self.command_public_pem = public
        return new

    def sign_node(self, csr_der: bytes, node_id: str, lifetime_s: float) -> IssuedCertificate:
        """Sign a node's CSR for ``node_id`` (taken from the token or the current certificate,
        never from the CSR); EnrollmentRefusedError if the CSR is not a valid request for it."""
        check_node_id(node_id)
        try:
            request = x509.load_der_x509_csr(csr_der)
        except ValueError as error:
            raise EnrollmentRefusedError(f"CSR is not a DER PKCS#10 request: {error}") from None
        try:
            valid = request.is_signature_valid
        except (InvalidSignature, UnsupportedAlgorithm, ValueError):
            valid = False
        if not valid:
            raise EnrollmentRefusedError("CSR signature is invalid: it was not made with its key")
        public_key = request.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise EnrollmentRefusedError("CSR key must be ECDSA P-256")
        names = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        named = [str(n.value) for n in names]
        if named != [node_id]:
            raise EnrollmentRefusedError(
                f"CSR is for node {', '.join(named)[:80]!r} but this enrollment is for node "
                f"{node_id!r}"
            )
        identity = spiffe_id(self.trust_domain, node_id)
        now = _now()
        not_after = now + datetime.timedelta(seconds=lifetime_s)
        serial = secrets.randbits(127) | 1
        if not isinstance(self._ca_key, ec.EllipticCurvePrivateKey):  # pragma: no cover
            raise PkiError("controller CA key is not ECDSA")
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
            .issuer_name(self.ca.subject)
            .public_key(public_key)
            .serial_number(serial)
            # Backdated for node clocks that run a little behind, by at most a twentieth of the
            # lifetime so that "renew at two thirds" stays meaningful for short lifetimes.
            .not_valid_before(now - min(CLOCK_SKEW, datetime.timedelta(seconds=lifetime_s / 20)))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                False,
            )
            .sign(self._ca_key, hashes.SHA256())
        )
        return IssuedCertificate(
            certificate=certificate,
            der=certificate.public_bytes(serialization.Encoding.DER),
            serial=f"{serial:x}",
            not_after=not_after.timestamp(),
            spiffe_id=identity,
        )


def random_id(size: int = 16) -> bytes:
    return os.urandom(size)


def bridge_identity(trust_domain: str) -> str:
    """The controller's name at the MQTT broker (its certificate's CN, the broker's user name
    for the ACL). The '@' is outside the node id alphabet: no node can ever be issued it."""
    return f"controller@{trust_domain}"


def issue_service_certificate(
    pki: ControllerPki, common_name: str, names: list[str], *, server: bool
) -> tuple[bytes, bytes]:
    """A key and certificate (PEM, the chain with the CA) for a service beside the controller:
    the MQTT broker (``server``: names in the SAN, serverAuth) or the controller's own MQTT
    client (clientAuth, no SPIFFE SAN: it cannot open a node's gRPC link)."""
    key = ec.generate_private_key(ec.SECP256R1())
    ca_key = pki.ca_key
    now = _now()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(pki.ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + SERVER_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(_san_entries(names)), False)
    certificate = builder.sign(ca_key, hashes.SHA256())
    chain = certificate.public_bytes(serialization.Encoding.PEM) + pki.ca_pem
    return _private_pem(key), chain
