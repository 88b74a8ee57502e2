"""In-process clients that do what a node does, step by step, so tests can change one step."""

from __future__ import annotations

import base64
import datetime
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.attest.tpm.client import TpmClient
from agent.identity.node_key import NodeKey
from agent.identity.tls import make_csr
from agent.link.channel import NODE_LINK_METHOD
from agent.link.enrollment import EnrollmentClient, fetch_pinned_ca
from agent.proto.accelguard.v1 import link_pb2 as pb
from agent.scrub.certificate import issue_certificate
from agent.scrub.model import PassResult, ScrubResult, ScrubTarget
from tests.link.support import Controller


@dataclass
class Enrolled:
    node_id: str
    key: ec.EllipticCurvePrivateKey
    certificate_der: bytes
    ca_pem: bytes
    scrub_key: NodeKey

    def credentials(self) -> grpc.ChannelCredentials:
        certificate = x509.load_der_x509_certificate(self.certificate_der)
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            certificate_chain=certificate.public_bytes(serialization.Encoding.PEM),
        )


def enrollment_client(controller: Controller) -> EnrollmentClient:
    ca = fetch_pinned_ca("127.0.0.1", controller.enroll_port, controller.fingerprint)
    return EnrollmentClient(controller.enroll_address, ca)


def begin_request(
    token: str, node_id: str, key: ec.EllipticCurvePrivateKey, scrub_key: NodeKey,
    tpm: TpmClient | None,
) -> tuple[pb.EnrollBegin, Any]:  # fmt: skip
    begin = pb.EnrollBegin(
        token=token, csr=make_csr(key, node_id), scrub_key_pem=scrub_key.public_pem(),
        agent_version="test",
    )  # fmt: skip
    ak = None
    if tpm is not None:
        ek = tpm.endorsement_key()
        ak = tpm.create_attestation_key()
        begin.ek_public = ek.public
        begin.ak_public = ak.public
    return begin, ak


def enroll(controller: Controller, node_id: str, tpm: TpmClient) -> Enrolled:
    key = ec.generate_private_key(ec.SECP256R1())
    scrub_key = NodeKey.generate()
    begin, ak = begin_request(controller.token(node_id), node_id, key, scrub_key, tpm)
    with enrollment_client(controller) as client:
        challenge = client.call(pb.EnrollRequest(begin=begin)).challenge
        secret = tpm.activate_credential(ak, challenge.credential_blob, challenge.encrypted_secret)
        tpm.flush_attestation_key(ak)
        response = client.call(
            pb.EnrollRequest(
                activate=pb.EnrollActivate(challenge_id=challenge.challenge_id, secret=secret)
            )
        )
    ca_pem = x509.load_der_x509_certificate(response.certificate.ca_certificate).public_bytes(
        serialization.Encoding.PEM
    )
    return Enrolled(node_id, key, response.certificate.certificate, ca_pem, scrub_key)


def link_stream(
    controller: Controller, credentials: grpc.ChannelCredentials, messages: Iterable[bytes],
    timeout: float = 20,
) -> Iterator[pb.Downlink]:  # fmt: skip
    """Send raw uplink messages on one stream; yield what comes back (RpcError on a status)."""
    with grpc.secure_channel(controller.link_address, credentials) as channel:
        call = channel.stream_stream(NODE_LINK_METHOD)(iter(messages), timeout=timeout)
        for data in call:
            downlink = pb.Downlink()
            downlink.ParseFromString(data)
            yield downlink


def hello(epoch: int = 7) -> bytes:
    return pb.Uplink(hello=pb.Hello(agent_version="test", epoch=epoch)).SerializeToString()


def report(seq: int, body: pb.Report) -> bytes:
    body.seq = seq
    body.after_seq = seq - 1
    body.created_at = 1.8e9
    return pb.Uplink(report=body).SerializeToString()


def signed_certificate(scrub_key: NodeKey, node_id: str) -> dict[str, Any]:
    started = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    result = ScrubResult(
        policy="zero", backend="simmem", total_bytes=1 << 20,
        passes=(PassResult(pattern=0, bytes_written=1 << 20, bytes_verified=1 << 20,
                           mismatched_bytes=0, write_seconds=0.01, verify_seconds=0.01),),
    )  # fmt: skip
    return issue_certificate(
        scrub_key, node_id=node_id,
        target=ScrubTarget(partition_uuid="GPU-test", gpu_uuid="GPU-test", gpu_index=0,
                           kind="gpu", visible_device="GPU-test", total_bytes=1 << 20),
        gpu_serial="", previous_lease_id="", previous_tenant="", result=result,
        started_at=started, finished_at=started,
    )  # fmt: skip


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
