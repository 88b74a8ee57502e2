"""The CLI's side of the admin socket: a thin synchronous gRPC client.

A refused call raises the error class agent/admin/status.py maps its status code to, with the
daemon's message; an unreachable daemon raises DaemonUnavailableError, with one line that names
the socket and how to start the agent (gRPC's own text, "failed to connect to all addresses; ...",
says neither).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from agent.admin.status import error_class_for
from agent.errors import AdminApiError, DaemonUnavailableError
from agent.proto.accelguard.v1 import admin_pb2 as pb
from agent.proto.accelguard.v1 import admin_pb2_grpc as pb_grpc
from agent.runtime.net import why_nobody_listens

T = TypeVar("T")


class AdminClient:
    """One channel to the daemon's admin socket; a context manager that closes it."""

    def __init__(self, socket: Path, timeout_s: float = 120.0) -> None:
        self._socket = socket
        self._timeout_s = timeout_s
        self._channel = grpc.insecure_channel(f"unix:{socket}")
        self._stub = pb_grpc.AdminStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., Any], request: Any, response: type[T]) -> T:
        try:
            result = method(request, timeout=self._timeout_s)
        except grpc.RpcError as error:
            code = error.code()
            details = error.details() or code.name
            down = why_nobody_listens(self._socket) if code == grpc.StatusCode.UNAVAILABLE else None
            if down is not None:
                raise DaemonUnavailableError(
                    f"cannot reach the agent at {self._socket} ({down}): is `accelguard agent` "
                    "running? Start it with `systemctl start accelguard`, or `accelguard agent` "
                    "in the foreground"
                ) from None
            raise error_class_for(code)(details) from None
        if not isinstance(result, response):
            raise AdminApiError(
                f"the agent answered with {type(result).__name__}, not {response.__name__}"
            )
        return result

    def ping(self) -> pb.PingResponse:
        return self._call(self._stub.Ping, pb.PingRequest(), pb.PingResponse)

    def status(self) -> pb.StatusResponse:
        return self._call(self._stub.GetStatus, pb.StatusRequest(), pb.StatusResponse)

    def plan_layout(self, request: pb.LayoutRequest) -> pb.LayoutResponse:
        return self._call(self._stub.PlanLayout, request, pb.LayoutResponse)

    def apply_layout(self, request: pb.LayoutRequest) -> pb.LayoutResponse:
        return self._call(self._stub.ApplyLayout, request, pb.LayoutResponse)

    def desired_layout(self) -> pb.DesiredLayoutResponse:
        return self._call(
            self._stub.GetDesiredLayout, pb.DesiredLayoutRequest(), pb.DesiredLayoutResponse
        )

    def forget_desired_layout(self, request: pb.DesiredLayoutRequest) -> pb.DesiredLayoutResponse:
        return self._call(self._stub.ForgetDesiredLayout, request, pb.DesiredLayoutResponse)

    def grant_lease(self, request: pb.GrantLeaseRequest) -> pb.GrantLeaseResponse:
        return self._call(self._stub.GrantLease, request, pb.GrantLeaseResponse)

    def bind_lease(self, lease_id: str, cgroup: str) -> pb.Lease:
        request = pb.BindLeaseRequest(lease_id=lease_id, cgroup=cgroup)
        return self._call(self._stub.BindLease, request, pb.Lease)

    def release_lease(self, lease_id: str) -> pb.Partition:
        return self._call(
            self._stub.ReleaseLease, pb.ReleaseLeaseRequest(lease_id=lease_id), pb.Partition
        )

    def list_leases(self, include_released: bool = False) -> pb.ListLeasesResponse:
        request = pb.ListLeasesRequest(include_released=include_released)
        return self._call(self._stub.ListLeases, request, pb.ListLeasesResponse)

    def list_partitions(self) -> pb.ListPartitionsResponse:
        return self._call(
            self._stub.ListPartitions, pb.ListPartitionsRequest(), pb.ListPartitionsResponse
        )

    def quarantine(self, partition_uuid: str, reason: str) -> pb.Partition:
        request = pb.PartitionActionRequest(partition_uuid=partition_uuid, reason=reason)
        return self._call(self._stub.QuarantinePartition, request, pb.Partition)

    def health(self, events: int = 10) -> pb.HealthResponse:
        request = pb.HealthRequest(events=events)
        return self._call(self._stub.GetHealth, request, pb.HealthResponse)

    def certificates(self, partition_uuid: str = "") -> list[str]:
        request = pb.ListCertificatesRequest(partition_uuid=partition_uuid)
        response = self._call(self._stub.ListCertificates, request, pb.ListCertificatesResponse)
        return list(response.certificates)

    def clear(self, partition_uuid: str, reason: str) -> pb.Partition:
        request = pb.PartitionActionRequest(partition_uuid=partition_uuid, reason=reason)
        return self._call(self._stub.ClearPartition, request, pb.Partition)
