"""Enrollment: a bootstrap token, a CSR and the node's TPM keys in; a node certificate out.

Order of checks (each refusal names its reason and stores nothing): token (known, unused,
unexpired), CSR (valid signature, P-256 key, subject CN = the token's node id), scrub-certificate
key, then the TPM: the AK's attributes (restricted signing key, fixedTPM, ...), and proof that
the AK lives in the TPM of the EK: MakeCredential(EK, Name(AK), secret) goes to the node, and only
a TPM holding both keys gives the secret back (TPM2_ActivateCredential). Only then is the
certificate signed, the token used up and the node recorded, in one transaction. Challenges are
held in memory (bounded, short-lived): a controller restart just makes the node start again.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.attest.tpm.checks import check_ak_attributes
from agent.attest.tpm.credential import make_credential
from agent.attest.tpm.keys import algorithm_of
from agent.attest.tpm.wire import compute_name, decode_public
from agent.controller.config import ControllerSection
from agent.controller.pki import ControllerPki
from agent.controller.store import ControllerStore, NodeEnrollment
from agent.controller.tokens import check_token
from agent.errors import AttestationError, EnrollmentRefusedError, QuoteError, ScrubError
from agent.link.envelope import command_key_id
from agent.proto.accelguard.v1 import link_pb2 as pb
from agent.scrub.certificate import key_fingerprint

CHALLENGE_TTL_S: Final = 120.0
MAX_PENDING: Final = 1024
SECRET_BYTES: Final = 32


@dataclass(frozen=True)
class _Pending:
    token_id: str
    node_id: str
    csr: bytes
    begin: pb.EnrollBegin
    ak_name: bytes
    secret: bytes
    deadline: float


class EnrollmentAuthority:
    """The controller's side of ``Enrollment.Enroll``; synchronous, run on the store's thread."""

    def __init__(self, store: ControllerStore, pki: ControllerPki, settings: ControllerSection):
        self._store = store
        self._pki = pki
        self._settings = settings
        self._pending: dict[bytes, _Pending] = {}

    def handle(self, request: pb.EnrollRequest) -> pb.EnrollResponse:
        if request.WhichOneof("step") == "begin":
            return self._begin(request.begin)
        return self._activate(request.activate)

    def _expire(self, now: float) -> None:
        for key in [k for k, p in self._pending.items() if p.deadline <= now]:
            del self._pending[key]

    def _begin(self, begin: pb.EnrollBegin) -> pb.EnrollResponse:
        now = time.time()
        self._expire(now)
        token = check_token(self._store, begin.token, now)
        # Signing a throw-away certificate checks everything about the CSR now, before the TPM
        # round trip; the one returned is signed after activation.
        self._pki.sign_node(begin.csr, token.node_id, 60.0)
        try:
            key_fingerprint(begin.scrub_key_pem)
        except ScrubError as error:
            raise EnrollmentRefusedError(f"scrub-certificate key: {error}") from None
        if not begin.ek_public:
            if not self._settings.allow_unattested:
                raise EnrollmentRefusedError(
                    "this controller enrolls only nodes with a TPM (EK and AK); set "
                    "controller.allow_unattested = true to admit nodes without one"
                )
            return self._issue(token.id, token.node_id, begin, b"", attested=False)
        ak_name = self._check_tpm_keys(begin)
        if len(self._pending) >= MAX_PENDING:
            raise EnrollmentRefusedError("too many enrollments in progress; try again shortly")
        secret = os.urandom(SECRET_BYTES)
        try:
            credential = make_credential(begin.ek_public, ak_name, secret)
        except (AttestationError, QuoteError) as error:
            raise EnrollmentRefusedError(f"endorsement key unusable: {error}") from None
        challenge_id = os.urandom(16)
        self._pending[challenge_id] = _Pending(
            token.id, token.node_id, begin.csr, begin, ak_name, secret, now + CHALLENGE_TTL_S
        )
        return pb.EnrollResponse(
            challenge=pb.CredentialChallenge(
                challenge_id=challenge_id,
                credential_blob=credential.credential_blob,
                encrypted_secret=credential.encrypted_secret,
            )
        )

    def _check_tpm_keys(self, begin: pb.EnrollBegin) -> bytes:
        try:
            violations = check_ak_attributes(begin.ak_public)
            algorithm = algorithm_of(begin.ak_public)
            ak_name = compute_name(begin.ak_public)
            ek = decode_public(begin.ek_public)
        except QuoteError as error:
            raise EnrollmentRefusedError(f"TPM key malformed: {error}") from None
        if violations:
            raise EnrollmentRefusedError(
                "attestation key refused: " + "; ".join(v.message for v in violations)
            )
        if algorithm is None:
            raise EnrollmentRefusedError("attestation key type is not ECC P-256 or RSA-2048")
        if begin.ek_certificate:
            # The EK certificate must certify this EK; checking its chain to a TPM
            # manufacturer's CA is policy for the attestation issue.
            try:
                certified = x509.load_der_x509_certificate(begin.ek_certificate).public_key()
            except ValueError as error:
                raise EnrollmentRefusedError(f"EK certificate unreadable: {error}") from None
            ek_key = ek.public_key()
            if (
                not isinstance(certified, rsa.RSAPublicKey)
                or not isinstance(ek_key, rsa.RSAPublicKey)
                or certified.public_numbers() != ek_key.public_numbers()
            ):
                raise EnrollmentRefusedError("EK certificate does not certify this EK")
        return ak_name

    def _activate(self, activate: pb.EnrollActivate) -> pb.EnrollResponse:
        now = time.time()
        self._expire(now)
        # One answer per challenge: a wrong answer ends it (no guessing).
        pending = self._pending.pop(activate.challenge_id, None)
        if pending is None:
            raise EnrollmentRefusedError(
                "no such enrollment challenge (expired, answered, or the controller restarted): "
                "start again"
            )
        if not hmac.compare_digest(activate.secret, pending.secret):
            raise EnrollmentRefusedError(
                "credential activation answer is wrong: the AK and the EK are not in the same "
                "TPM (or the answer came from another TPM)"
            )
        return self._issue(
            pending.token_id, pending.node_id, pending.begin, pending.ak_name, attested=True
        )

    def _issue(
        self, token_id: str, node_id: str, begin: pb.EnrollBegin, ak_name: bytes, *, attested: bool
    ) -> pb.EnrollResponse:
        issued = self._pki.sign_node(begin.csr, node_id, self._settings.node_cert_lifetime_s)
        self._store.complete_enrollment(
            token_id,
            NodeEnrollment(
                node_id=node_id,
                spiffe_id=issued.spiffe_id,
                attestation="attested" if attested else "unattested",
                ek_public=begin.ek_public,
                ek_certificate=begin.ek_certificate,
                ak_public=begin.ak_public,
                ak_name=ak_name,
                scrub_key_pem=begin.scrub_key_pem,
                cert_serial=issued.serial,
                cert_not_after=issued.not_after,
                agent_version=begin.agent_version,
            ),
        )
        # The node pins the current command key: sign its commands with that one.
        self._store.commands.set_command_key(
            node_id, command_key_id(self._pki.command_key.public_key())
        )
        message = self.certificate_message(issued.der, node_id, issued.spiffe_id, attested)
        return pb.EnrollResponse(certificate=message)

    def certificate_message(
        self, der: bytes, node_id: str, spiffe: str, attested: bool
    ) -> pb.EnrolledCertificate:
        return pb.EnrolledCertificate(
            certificate=der,
            ca_certificate=self._pki.ca_der,
            command_public_key_pem=self._pki.command_public_pem.decode("ascii"),
            node_id=node_id,
            spiffe_id=spiffe,
            attested=attested,
        )


def ek_digest(ek_public: bytes) -> str:
    return hashlib.sha256(ek_public).hexdigest() if ek_public else ""


def pem_of(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
