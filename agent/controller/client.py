"""``accelguard ctl``'s side of the controller's admin socket: a thin synchronous client."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from agent.errors import (
    AccelguardError,
    DaemonUnavailableError,
    LinkError,
    NotFoundError,
    PermissionDeniedError,
    ValidationError,
)
from agent.proto.accelguard.v1 import controller_pb2 as pb
from agent.proto.accelguard.v1 import controller_pb2_grpc as pb_grpc
from agent.runtime.net import why_nobody_listens

T = TypeVar("T")

_ERROR_FOR: dict[grpc.StatusCode, type[AccelguardError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: ValidationError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


class ControllerClient:
    def __init__(self, socket: Path, timeout_s: float = 30.0) -> None:
        self._socket = socket
        self._timeout_s = timeout_s
        self._channel = grpc.insecure_channel(f"unix:{socket}")
        self._stub = pb_grpc.ControllerAdminStub(self._channel)

    def __enter__(self) -> ControllerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._channel.close()

    def _call(
        self,
        method: Callable[..., Any],
        request: Any,
        response: type[T],
        timeout_s: float | None = None,
    ) -> T:
        try:
            result = method(request, timeout=timeout_s or self._timeout_s)
        except grpc.RpcError as error:
            code = error.code()
            down = why_nobody_listens(self._socket) if code == grpc.StatusCode.UNAVAILABLE else None
            if down is not None:
                raise DaemonUnavailableError(
                    f"cannot reach the controller at {self._socket} ({down}): is "
                    "`accelguard controller serve` running?"
                ) from None
            raise _ERROR_FOR.get(code, LinkError)(error.details() or code.name) from None
        if not isinstance(result, response):
            raise LinkError(f"the controller answered {type(result).__name__}")
        return result

    def create_token(self, node_id: str, ttl_s: float) -> pb.CreateTokenResponse:
        request = pb.CreateTokenRequest(node_id=node_id, ttl_s=ttl_s)
        return self._call(self._stub.CreateToken, request, pb.CreateTokenResponse)

    def nodes(self) -> pb.ListNodesResponse:
        return self._call(self._stub.ListNodes, pb.ListNodesRequest(), pb.ListNodesResponse)

    def node(self, node_id: str) -> pb.NodeDetail:
        return self._call(self._stub.GetNode, pb.GetNodeRequest(node_id=node_id), pb.NodeDetail)

    def certificates(self, node_id: str) -> pb.ListNodeCertificatesResponse:
        request = pb.ListNodeCertificatesRequest(node_id=node_id)
        return self._call(self._stub.ListNodeCertificates, request, pb.ListNodeCertificatesResponse)

    def audit_checkpoints(self, node_id: str) -> pb.ListAuditCheckpointsResponse:
        request = pb.ListAuditCheckpointsRequest(node_id=node_id)
        return self._call(self._stub.ListAuditCheckpoints, request, pb.ListAuditCheckpointsResponse)

    def run_command(self, request: pb.RunCommandRequest) -> pb.CommandStatus:
        # The controller waits up to the request's timeout for the node: wait a little longer.
        wait = (request.timeout_s or 3600.0) + 30.0
        return self._call(self._stub.RunCommand, request, pb.CommandStatus, timeout_s=wait)

    def list_commands(self, node_id: str, limit: int) -> pb.ListCommandsResponse:
        request = pb.ListCommandsRequest(node_id=node_id, limit=limit)
        return self._call(self._stub.ListCommands, request, pb.ListCommandsResponse)

    def set_policy(self, group: str, document: str) -> pb.SetPolicyResponse:
        request = pb.SetPolicyRequest(group=group, policy_json=document)
        return self._call(self._stub.SetPolicy, request, pb.SetPolicyResponse)

    def set_node_group(self, node_id: str, group: str) -> pb.SetNodeGroupResponse:
        request = pb.SetNodeGroupRequest(node_id=node_id, group=group)
        return self._call(self._stub.SetNodeGroup, request, pb.SetNodeGroupResponse)

    def rotate_command_key(self) -> pb.RotateCommandKeyResponse:
        request = pb.RotateCommandKeyRequest()
        return self._call(self._stub.RotateCommandKey, request, pb.RotateCommandKeyResponse)
