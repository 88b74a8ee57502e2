"""Every refusal names its reason, and leaves nothing stored at the controller."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.attest.tpm.client import TpmClient
from agent.controller.pki import ControllerPki, init_pki
from agent.errors import EnrollmentRefusedError, LinkProtocolError, TpmError
from agent.identity.node_key import NodeKey
from agent.proto.accelguard.v1 import link_pb2 as pb
from agent.scrub.certificate import canonical_json
from agent.sim.swtpm import Swtpm
from tests.link.clients import (
    Enrolled,
    begin_request,
    enroll,
    enrollment_client,
    hello,
    link_stream,
    report,
    signed_certificate,
)
from tests.link.support import Controller, LinkNode, wait_for


@pytest.fixture
def tpms(tmp_path: Path) -> Iterator[list[TpmClient]]:
    swtpms = [Swtpm(tmp_path / f"swtpm{i}") for i in range(2)]
    clients: list[TpmClient] = []
    try:
        for swtpm in swtpms:
            swtpm.start()
            clients.append(TpmClient(swtpm.tcti))
        yield clients
    finally:
        for client in clients:
            client.close()
        for swtpm in swtpms:
            swtpm.stop()


def _nothing_stored(controller: Controller, token_used: int = 0) -> None:
    assert controller.query("SELECT COUNT(*) FROM nodes") == [(0,)]
    assert controller.query("SELECT COUNT(*) FROM reports") == [(0,)]
    assert controller.query("SELECT COUNT(*) FROM tokens WHERE used_at IS NOT NULL") == [
        (token_used,)
    ]


def test_reused_token_is_refused(controller: Controller, one_node: LinkNode) -> None:
    one_node.configure({"controller": controller.link_address})
    one_node.agent.start()
    token = controller.token(one_node.node_id)
    assert one_node.enroll(token).returncode == 0
    before = controller.query("SELECT id, enrolled_at, ak_public, cert_serial FROM nodes")
    again = one_node.enroll(token)
    assert again.returncode == 2
    assert "already used" in again.stderr
    assert controller.query("SELECT id, enrolled_at, ak_public, cert_serial FROM nodes") == before


def test_expired_token_is_refused(controller: Controller, one_node: LinkNode) -> None:
    one_node.configure({"controller": controller.link_address})
    one_node.agent.start()
    token = controller.token(one_node.node_id, ttl="1")
    time.sleep(1.2)
    result = one_node.enroll(token)
    assert result.returncode == 2
    assert "expired" in result.stderr
    _nothing_stored(controller)


def test_other_nodes_token_is_refused(controller: Controller, one_node: LinkNode) -> None:
    one_node.configure({"controller": controller.link_address})
    one_node.agent.start()
    result = one_node.enroll(controller.token("some-other-node"))
    assert result.returncode == 2
    assert f"CSR is for node '{one_node.node_id}'" in result.stderr
    assert "some-other-node" in result.stderr
    _nothing_stored(controller)


def test_wrong_ca_fingerprint_is_refused_before_anything_is_sent(
    controller: Controller, one_node: LinkNode
) -> None:
    one_node.configure({"controller": controller.link_address})
    one_node.agent.start()
    result = one_node.enroll(controller.token(one_node.node_id), fingerprint="ab" * 32)
    assert result.returncode == 2
    assert "fingerprint" in result.stderr
    _nothing_stored(controller)


def test_csr_for_another_node_id_is_refused(controller: Controller, tpms: list[TpmClient]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    begin, _ = begin_request(controller.token("node-a"), "node-b", key, NodeKey.generate(), tpms[0])
    with enrollment_client(controller) as client, pytest.raises(EnrollmentRefusedError) as refused:
        client.call(pb.EnrollRequest(begin=begin))
    assert "CSR is for node 'node-b' but this enrollment is for node 'node-a'" in str(refused.value)
    _nothing_stored(controller)


def _clear_restricted(ak_public: bytes) -> bytes:
    # TPM2B_PUBLIC: size (2), type (2), nameAlg (2), objectAttributes (4, big endian).
    attributes = int.from_bytes(ak_public[6:10], "big") & ~(1 << 16)  # TPMA_OBJECT restricted
    return ak_public[:6] + attributes.to_bytes(4, "big") + ak_public[10:]


def test_ak_with_wrong_attributes_is_refused(controller: Controller, tpms: list[TpmClient]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    begin, ak = begin_request(
        controller.token("node-a"), "node-a", key, NodeKey.generate(), tpms[0]
    )
    tpms[0].flush_attestation_key(ak)
    begin.ak_public = _clear_restricted(begin.ak_public)
    with enrollment_client(controller) as client, pytest.raises(EnrollmentRefusedError) as refused:
        client.call(pb.EnrollRequest(begin=begin))
    assert "restricted is clear" in str(refused.value)
    _nothing_stored(controller)


def test_activate_credential_answer_from_another_tpm_is_refused(
    controller: Controller, tpms: list[TpmClient]
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    begin, ak = begin_request(
        controller.token("node-a"), "node-a", key, NodeKey.generate(), tpms[0]
    )
    tpms[0].flush_attestation_key(ak)
    with enrollment_client(controller) as client:
        challenge = client.call(pb.EnrollRequest(begin=begin)).challenge
        # The other TPM cannot open a credential made for the first one's EK ...
        other_ak = tpms[1].create_attestation_key()
        with pytest.raises(TpmError):
            tpms[1].activate_credential(
                other_ak, challenge.credential_blob, challenge.encrypted_secret
            )
        tpms[1].flush_attestation_key(other_ak)
        # ... so whatever it answers is not the secret.
        answer = pb.EnrollActivate(challenge_id=challenge.challenge_id, secret=b"\x00" * 32)
        with pytest.raises(EnrollmentRefusedError) as refused:
            client.call(pb.EnrollRequest(activate=answer))
        assert "not in the same TPM" in str(refused.value)
        # One answer per challenge: the right one is no use any more.
        with pytest.raises(EnrollmentRefusedError, match="no such enrollment challenge"):
            client.call(pb.EnrollRequest(activate=answer))
    _nothing_stored(controller)


def test_client_certificate_from_another_ca_is_refused(
    controller: Controller, tpms: list[TpmClient], tmp_path: Path
) -> None:
    enrolled = enroll(controller, "node-a", tpms[0])
    rogue_dir = tmp_path / "rogue"
    init_pki(rogue_dir, "test.fleet", ["127.0.0.1"])
    rogue = ControllerPki(rogue_dir, "test.fleet")
    from agent.identity.tls import make_csr  # noqa: PLC0415

    forged = rogue.sign_node(make_csr(enrolled.key, "node-a"), "node-a", 3600)
    impostor = Enrolled("node-a", enrolled.key, forged.der, enrolled.ca_pem, enrolled.scrub_key)
    with pytest.raises(grpc.RpcError) as failed:
        list(link_stream(controller, impostor.credentials(), [hello()]))
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails
    assert controller.query("SELECT COUNT(*) FROM reports") == [(0,)]
    # The real certificate still works.
    replies = list(link_stream(controller, enrolled.credentials(), [hello()]))
    assert replies[0].WhichOneof("message") == "hello"


def test_a_nodes_certificate_cannot_report_for_another_node(
    controller: Controller, tpms: list[TpmClient]
) -> None:
    node_a = enroll(controller, "node-a", tpms[0])
    node_b = enroll(controller, "node-b", tpms[1])
    for claimed, signer in (("node-b", node_a.scrub_key), ("node-b", node_b.scrub_key)):
        document = signed_certificate(signer, claimed)
        body = pb.Report(
            scrub_certificate=pb.ScrubCertificate(
                canonical_payload=canonical_json(document["payload"]),
                signature=base64.b64decode(document["signature"]),
                algorithm="Ed25519",
            )
        )
        with pytest.raises(grpc.RpcError) as refused:
            list(link_stream(controller, node_a.credentials(), [hello(), report(1, body)]))
        code = refused.value.code()
        if signer is node_a.scrub_key:
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert "certificate is for node 'node-b'" in refused.value.details()
        else:  # B's key: not the key node A enrolled
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "does not verify with the node's enrolled key" in refused.value.details()
    assert controller.query("SELECT COUNT(*) FROM reports") == [(0,)]
    assert controller.query("SELECT COUNT(*) FROM scrub_certificates") == [(0,)]


@pytest.mark.parametrize(
    "message",
    [b"\xff\xff\xff", b"\x12\x05\x08", pb.Uplink().SerializeToString(),
     pb.Uplink(report=pb.Report(seq=1, created_at=1.8e9)).SerializeToString()],
    ids=["garbage", "truncated", "empty", "report-without-body"],
)  # fmt: skip
def test_malformed_uplink_ends_the_stream_and_stores_nothing(
    controller: Controller, tpms: list[TpmClient], message: bytes
) -> None:
    node = enroll(controller, "node-a", tpms[0])
    with pytest.raises(grpc.RpcError) as refused:
        list(link_stream(controller, node.credentials(), [hello(), message]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details()
    assert controller.query("SELECT COUNT(*) FROM reports") == [(0,)]


def test_malformed_enrollment_request_is_refused(controller: Controller) -> None:
    with enrollment_client(controller) as client:
        with pytest.raises(LinkProtocolError, match="no step set"):
            client.call(pb.EnrollRequest())
        with pytest.raises(LinkProtocolError, match="token"):
            client.call(pb.EnrollRequest(begin=pb.EnrollBegin(csr=b"x", scrub_key_pem="x")))
    _nothing_stored(controller)


def test_a_report_lost_in_transit_ends_the_session_and_the_node_resumes_before_it(
    controller: Controller, tpms: list[TpmClient]
) -> None:
    """Seqs may skip where the node dropped reports (it says so in after_seq); a report that
    went missing on the way (a broker queue that overflowed) may not be acked over."""
    node = enroll(controller, "node-a", tpms[0])

    def sample(seq: int, after_seq: int) -> bytes:
        body = pb.Report(health=pb.HealthSample(uptime_s=float(seq)))
        body.seq, body.after_seq, body.created_at = seq, after_seq, 1.8e9
        return pb.Uplink(report=body).SerializeToString()

    # 3 and 4 dropped by the node (after_seq says 2), then 6 missing in transit before 7.
    stream = [hello(), sample(1, 0), sample(2, 1), sample(5, 2), sample(7, 6)]
    with pytest.raises(grpc.RpcError) as refused:
        list(link_stream(controller, node.credentials(), stream))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "report 7 follows 6, but the last report of this session was 5" in (
        refused.value.details() or ""
    )
    # What came before the gap is committed (group commit: it may land just after the status).
    wait_for(
        lambda: [row[0] for row in controller.query("SELECT seq FROM reports ORDER BY seq")]
        == [1, 2, 5],
        "reports 1, 2 and 5 stored, never 7",
    )
    replies = list(link_stream(controller, node.credentials(), [hello()]))
    assert replies[0].hello.resume_after == 5
