"""gRPC settings of the link, one place for both ends.

Keepalive: the node pings after ``keepalive_time_s`` without traffic and declares the
controller dead when a ping is not answered within ``keepalive_timeout_s`` (defaults 10 s + 10 s:
a dead peer is detected in about 20 s, and traffic every 10 s keeps NAT mappings, which expire
after minutes, alive). The controller must accept pings that often (gRPC's server default
refuses pings closer than 5 minutes without data, with GOAWAY "too_many_pings"), and pings its
nodes itself to drop streams whose node vanished without a FIN.
"""

from __future__ import annotations

from typing import Any

from agent.link.wire import MAX_MESSAGE_BYTES

NODE_LINK_METHOD = "/accelguard.v1.NodeLink/Connect"
ENROLL_METHOD = "/accelguard.v1.Enrollment/Enroll"


def client_options(keepalive_time_s: float, keepalive_timeout_s: float) -> list[tuple[str, Any]]:
    return [
        ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Our own backoff (full jitter, configurable cap) decides when to dial again.
        ("grpc.enable_retries", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


def server_options(keepalive_time_s: float, keepalive_timeout_s: float) -> list[tuple[str, Any]]:
    return [
        ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 4000),
        ("grpc.http2.min_ping_interval_without_data_ms", 4000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Never share a port with a stale controller still bound to it.
        ("grpc.so_reuseport", 0),
    ]
