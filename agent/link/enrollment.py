"""The node's side of enrollment (``accelguard enroll``).

1. Pin the controller CA: read the certificate chain from a TLS handshake with the enrollment
   port and keep the certificate whose SHA-256 is the fingerprint the operator gave (it must be
   a CA and must have issued the server's certificate). From then on gRPC verifies the
   controller against that CA alone.
2. Make the node's TLS key (0600; it never leaves the node) and a CSR for ``node.id``.
3. Send CSR + EK public (+ EK certificate) + AK public + the scrub-certificate key; answer the
   controller's credential challenge with TPM2_ActivateCredential; receive the certificate.
4. Check the certificate (our key, our node id, the pinned CA) and write the files.
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent import __version__
from agent.errors import (
    EnrollmentRefusedError,
    IdentityError,
    LinkError,
    LinkProtocolError,
    ValidationError,
)
from agent.identity.tls import (
    IdentityPaths,
    check_issued_certificate,
    create_key,
    load_certificate_der,
    make_csr,
    store_enrollment,
)
from agent.link.channel import ENROLL_METHOD, client_options
from agent.link.wire import parse
from agent.proto.accelguard.v1 import link_pb2 as pb

if TYPE_CHECKING:
    from agent.config import Config

_FINGERPRINT = re.compile(r"(?:sha256:)?([0-9a-fA-F:]{64,95})")


def parse_address(address: str) -> tuple[str, int]:
    match = re.fullmatch(r"\[?([A-Za-z0-9.:-]+?)\]?:([0-9]{1,5})", address)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ValidationError(f"controller address {address!r} must be HOST:PORT")
    return match.group(1), int(match.group(2))


def normalise_fingerprint(text: str) -> str:
    match = _FINGERPRINT.fullmatch(text.strip())
    digits = match.group(1).replace(":", "").lower() if match else ""
    if len(digits) != 64:
        raise ValidationError(
            "--ca-fingerprint must be the CA certificate's SHA-256, 64 hex digits (as "
            "`accelguard controller init` prints it)"
        )
    return digits


def fetch_pinned_ca(host: str, port: int, fingerprint: str, timeout_s: float = 10.0) -> bytes:
    """The controller CA (PEM) from the server's TLS chain, pinned by ``fingerprint``."""
    wanted = normalise_fingerprint(fingerprint)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Nothing is trusted yet: the chain is checked below against the pinned fingerprint.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])  # gRPC servers refuse TLS without HTTP/2 ALPN
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            # Python 3.11 has no public accessor for the peer's chain (3.13 adds
            # SSLSocket.get_unverified_chain); the C object has had it since 3.10.
            chain = _peer_chain(tls)
    except (OSError, ssl.SSLError) as error:
        raise LinkError(f"cannot reach the controller at {host}:{port}: {error}") from error
    if not chain:
        raise LinkError(f"the controller at {host}:{port} sent no certificate")
    pinned = [der for der in chain if hashlib.sha256(der).hexdigest() == wanted]
    if not pinned:
        raise EnrollmentRefusedError(
            f"no certificate the controller at {host}:{port} presented has fingerprint {wanted}: "
            "wrong fingerprint, or not the controller you think"
        )
    ca = x509.load_der_x509_certificate(pinned[0])
    leaf = x509.load_der_x509_certificate(chain[0])
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise EnrollmentRefusedError("the pinned certificate is not a CA certificate")
    try:
        leaf.verify_directly_issued_by(ca)
    except Exception as error:  # noqa: BLE001 - InvalidSignature, ValueError, TypeError alike
        raise EnrollmentRefusedError(
            f"the controller's certificate was not issued by the pinned CA: {error}"
        ) from None
    return ca.public_bytes(serialization.Encoding.PEM)


def _peer_chain(tls: ssl.SSLSocket) -> list[bytes]:
    """The certificates the peer sent, leaf first, DER, unverified.

    Python 3.11 has no public accessor for them (3.13 adds SSLSocket.get_unverified_chain); the
    C object behind an SSLSocket has had get_unverified_chain since 3.10.
    """
    native: Any = getattr(tls, "_sslobj", None)
    if native is None or not hasattr(native, "get_unverified_chain"):
        raise LinkError("this Python cannot read a TLS peer's certificate chain")
    encoding: int = getattr(ssl, "_ssl").ENCODING_DER  # noqa: B009 - private module
    return [bytes(c.public_bytes(encoding)) for c in native.get_unverified_chain() or []]


class EnrollmentClient:
    """One gRPC channel to the enrollment port, trusting only the pinned CA."""

    def __init__(self, address: str, ca_pem: bytes, timeout_s: float = 60.0) -> None:
        self._timeout_s = timeout_s
        credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
        self._channel = grpc.secure_channel(address, credentials, options=client_options(10, 10))
        self._call = self._channel.unary_unary(
            ENROLL_METHOD, request_serializer=pb.EnrollRequest.SerializeToString
        )

    def __enter__(self) -> EnrollmentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._channel.close()

    def call(self, request: pb.EnrollRequest) -> pb.EnrollResponse:
        try:
            data = self._call(request, timeout=self._timeout_s)
        except grpc.RpcError as error:
            code = error.code()
            details = error.details() or code.name
            if code == grpc.StatusCode.PERMISSION_DENIED:
                raise EnrollmentRefusedError(f"the controller refused: {details}") from None
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise LinkProtocolError(f"the controller refused the request: {details}") from None
            raise LinkError(f"enrollment call failed ({code.name}): {details}") from None
        response = parse(data, pb.EnrollResponse, "enrollment response")
        if response.WhichOneof("step") is None:
            raise LinkProtocolError("the controller's enrollment response is empty")
        return response


@dataclass(frozen=True)
class EnrollResult:
    node_id: str
    spiffe_id: str
    attested: bool
    certificate_not_after: float


def _scrub_key_pem(config: Config) -> str:
    from agent.identity.node_key import NODE_KEY_FILE, NodeKey  # noqa: PLC0415

    path = config.node.state_dir / NODE_KEY_FILE
    if not path.exists():
        # The agent creates its node key together with its journal (a key without a journal
        # means a lost journal): enrollment must not be the one to create it.
        raise IdentityError(
            f"the node key {path} does not exist yet: start the agent once, then enroll"
        )
    return NodeKey.load(path).public_pem()


def enroll(
    config: Config, controller: str, token: str, fingerprint: str, *, use_tpm: bool = True
) -> EnrollResult:
    host, port = parse_address(controller)
    node_id = config.node.id
    paths = IdentityPaths(config.link.cert_dir)
    scrub_key = _scrub_key_pem(config)
    ca_pem = fetch_pinned_ca(host, port, fingerprint)
    ca = x509.load_pem_x509_certificate(ca_pem)
    # A fresh key per enrollment: a re-enrolled node does not keep a key an earlier, possibly
    # compromised, installation had.
    key = create_key(paths.key.with_name("node.key.new"))
    begin = pb.EnrollBegin(
        token=token, csr=make_csr(key, node_id), scrub_key_pem=scrub_key,
        agent_version=__version__,
    )  # fmt: skip
    with EnrollmentClient(controller, ca_pem) as client:
        if use_tpm:
            response = _enroll_with_tpm(config, client, begin)
        else:
            response = client.call(pb.EnrollRequest(begin=begin))
    if response.WhichOneof("step") != "certificate":
        raise LinkProtocolError("the controller sent a challenge where a certificate was due")
    issued = response.certificate
    certificate = load_certificate_der(issued.certificate, "the node certificate")
    check_issued_certificate(certificate, key, ca, node_id)
    if load_certificate_der(issued.ca_certificate, "the CA certificate") != ca:
        raise LinkProtocolError("the controller returned another CA than the one pinned")
    paths.key.with_name("node.key.new").replace(paths.key)
    store_enrollment(
        paths,
        certificate=certificate,
        ca=ca,
        command_key_pem=issued.command_public_key_pem,
        details={
            "node_id": node_id, "spiffe_id": issued.spiffe_id, "attested": issued.attested,
            "controller": controller, "ca_fingerprint": normalise_fingerprint(fingerprint),
            "enrolled_at": time.time(),
        },
    )  # fmt: skip
    return EnrollResult(
        node_id=node_id,
        spiffe_id=issued.spiffe_id,
        attested=issued.attested,
        certificate_not_after=certificate.not_valid_after_utc.timestamp(),
    )


def _enroll_with_tpm(config: Config, client: EnrollmentClient, begin: pb.EnrollBegin) -> Any:
    from agent.attest.tpm.client import TpmClient  # noqa: PLC0415 - tpm2-pytss is optional

    with TpmClient(config.attest.tcti) as tpm:
        endorsement = tpm.endorsement_key()
        ak = tpm.ensure_attestation_key(config.attest.ak_handle)
        begin.ek_public = endorsement.public
        begin.ek_certificate = endorsement.certificate or b""
        begin.ak_public = ak.public
        response = client.call(pb.EnrollRequest(begin=begin))
        if response.WhichOneof("step") != "challenge":
            raise LinkProtocolError("the controller skipped the TPM credential challenge")
        challenge = response.challenge
        secret = tpm.activate_credential(ak, challenge.credential_blob, challenge.encrypted_secret)
    return client.call(
        pb.EnrollRequest(
            activate=pb.EnrollActivate(challenge_id=challenge.challenge_id, secret=secret)
        )
    )
