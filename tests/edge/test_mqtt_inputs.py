"""What arrives from the broker is bytes from the network: the state and topic parsers answer
a value or a clear error, never anything else (hypothesis), and the examples say which is which."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import LinkProtocolError
from agent.identity.spiffe import NODE_ID
from agent.link.mqtt import parse_state, parse_topic, state_payload, topics


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_any_bytes_are_a_state_or_a_clear_error(data: bytes) -> None:
    try:
        state, transport = parse_state(data)
    except LinkProtocolError as error:
        assert str(error).startswith("state message")
    else:
        assert state in ("online", "offline") and transport in ("", "grpc", "mqtt")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_topic_is_one_of_ours_or_none(topic: str) -> None:
    parsed = parse_topic(topic)
    if parsed is not None:
        node_id, leaf = parsed
        assert NODE_ID.fullmatch(node_id) and leaf in ("up", "down", "state")
        assert getattr(topics(node_id), leaf) == topic


def test_state_examples() -> None:
    assert parse_state(state_payload("online", "mqtt")) == ("online", "mqtt")
    assert parse_state(state_payload("offline", "")) == ("offline", "")
    for bad in (b"", b"[]", b'{"state": "up"}', b'{"state": "online", "transport": "tcp"}',
                b"\xff\xfe", b'{"state": "online", "transport": 7}'):  # fmt: skip
        with pytest.raises(LinkProtocolError):
            parse_state(bad)


def test_topic_examples() -> None:
    assert parse_topic("accelguard/v1/gpu-7.rack3/up") == ("gpu-7.rack3", "up")
    for other in ("accelguard/v1/+/up", "accelguard/v1/a/b/up", "accelguard/v1//up",
                  "accelguard/v2/n/up", "accelguard/v1/n/left", "accelguard/v1/-n/up"):  # fmt: skip
        assert parse_topic(other) is None
