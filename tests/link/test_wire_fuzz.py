"""The link's decoders on hostile bytes: a validated message or LinkProtocolError, nothing else."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import LinkProtocolError
from agent.link.wire import decode_downlink, decode_enroll_request, decode_uplink
from agent.proto.accelguard.v1 import link_pb2 as pb
from tests.fuzzing import MUTATIONS, fuzz, mutate

VALID_UPLINKS = [
    pb.Uplink(hello=pb.Hello(agent_version="0.1.0", boot_id="b", epoch=5, last_seq=9)),
    pb.Uplink(report=pb.Report(seq=3, created_at=1.8e9, health=pb.HealthSample(uptime_s=2))),
    pb.Uplink(report=pb.Report(seq=4, created_at=1.8e9, inventory=pb.InventorySnapshot(
        gpus=[pb.InventoryGpu(uuid="GPU-1", name="H100")],
        partitions=[pb.InventoryPartition(uuid="GPU-1", kind="gpu", state="free", clean=True)],
    ))),
    pb.Uplink(report=pb.Report(seq=5, created_at=1.8e9, lease=pb.LeaseEvent(
        lease_id="lease-1", partition_uuid="GPU-1", tenant="t", state="active"))),
    pb.Uplink(report=pb.Report(seq=6, created_at=1.8e9, scrub_certificate=pb.ScrubCertificate(
        canonical_payload=b"{}", signature=b"s" * 64, algorithm="Ed25519"))),
    pb.Uplink(renew=pb.RenewCertificate(csr=b"\x30\x82")),
]  # fmt: skip
VALID_ENROLLS = [
    pb.EnrollRequest(begin=pb.EnrollBegin(token="agt1.x", csr=b"c", scrub_key_pem="k",
                                          ek_public=b"e", ak_public=b"a")),
    pb.EnrollRequest(activate=pb.EnrollActivate(challenge_id=b"c" * 16, secret=b"s" * 32)),
]  # fmt: skip
VALID_DOWNLINKS = [
    pb.Downlink(hello=pb.HelloReply(resume_after=3, server_time=1.8e9)),
    pb.Downlink(ack=pb.Ack(seq=9)),
    pb.Downlink(certificate=pb.EnrolledCertificate(certificate=b"x" * 300)),
]

DECODERS: list[tuple[Callable[[bytes], Message], list[Message]]] = [
    (decode_uplink, VALID_UPLINKS),  # type: ignore[list-item]
    (decode_enroll_request, VALID_ENROLLS),  # type: ignore[list-item]
    (decode_downlink, VALID_DOWNLINKS),  # type: ignore[list-item]
]


def _decodes_or_refuses(decoder: Callable[[bytes], Message], data: bytes) -> None:
    try:
        decoder(data)
    except LinkProtocolError as error:
        assert str(error)


@pytest.mark.parametrize(("decoder", "valid"), DECODERS, ids=["uplink", "enroll", "downlink"])
def test_valid_messages_decode(decoder: Callable[[bytes], Message], valid: list[Message]) -> None:
    for message in valid:
        assert decoder(message.SerializeToString()) == message


@pytest.mark.parametrize(("decoder", "valid"), DECODERS, ids=["uplink", "enroll", "downlink"])
@fuzz(1500)
@given(data=st.binary(max_size=512))
def test_random_bytes(
    decoder: Callable[[bytes], Message], valid: list[Message], data: bytes
) -> None:
    _decodes_or_refuses(decoder, data)


@pytest.mark.parametrize(("decoder", "valid"), DECODERS, ids=["uplink", "enroll", "downlink"])
@fuzz(1500)
@given(index=st.integers(0, 100), mutations=MUTATIONS)
def test_mutated_and_truncated_valid_messages(
    decoder: Callable[[bytes], Message],
    valid: list[Message],
    index: int,
    mutations: list[tuple[str, int, int]],
) -> None:
    data = valid[index % len(valid)].SerializeToString()
    _decodes_or_refuses(decoder, mutate(data, mutations))
    for cut in range(len(data)):
        _decodes_or_refuses(decoder, data[:cut])


def test_nesting_bomb_is_refused() -> None:
    # A report body nested a thousand levels deep in unknown fields: upb's recursion limit.
    data = b""
    for _ in range(1000):
        data = b"\x12" + _varint(len(data)) + data
    _decodes_or_refuses(decode_uplink, data)


def test_oversized_message_is_refused_before_parsing() -> None:
    with pytest.raises(LinkProtocolError, match="over the"):
        decode_uplink(b"\x00" * ((16 << 20) + 1))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
