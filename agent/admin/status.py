"""The one table between accelguard's errors and gRPC status codes, for both ends of the socket.

The server answers an error with the code of its first row the error is an instance of (so a
subclass row comes before its base), INTERNAL for any other. The client turns a code back into
the error class of the first row with that code, so that the CLI exits with the code the daemon's
error carries (:class:`~agent.errors.ExitCode`); the message travels as the status details.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import grpc

from agent.errors import (
    AccelguardError,
    AdminApiError,
    HardwareError,
    InsufficientResourcesError,
    InUseError,
    NotFoundError,
    PermissionDeniedError,
    RetryLaterError,
    ValidationError,
)


@dataclass(frozen=True)
class StatusRow:
    error: type[AccelguardError]
    code: grpc.StatusCode
    # False where gRPC itself also answers with this code, so the client cannot tell the
    # daemon's error from the transport's: UNAVAILABLE is also "nothing listens on the socket".
    client_maps_back: bool = True


STATUS_TABLE: Final = (
    StatusRow(NotFoundError, grpc.StatusCode.NOT_FOUND),
    StatusRow(PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    StatusRow(RetryLaterError, grpc.StatusCode.ABORTED),
    StatusRow(ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    StatusRow(InsufficientResourcesError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    StatusRow(InUseError, grpc.StatusCode.FAILED_PRECONDITION),
    StatusRow(HardwareError, grpc.StatusCode.UNAVAILABLE, client_maps_back=False),
)


def status_code_for(error: AccelguardError) -> grpc.StatusCode:
    """The server's side: the code that carries ``error`` to the client."""
    for row in STATUS_TABLE:
        if isinstance(error, row.error):
            return row.code
    return grpc.StatusCode.INTERNAL


def error_class_for(code: grpc.StatusCode) -> type[AccelguardError]:
    """The client's side: the error class a status code stands for (AdminApiError if none)."""
    for row in STATUS_TABLE:
        if row.code == code and row.client_maps_back:
            return row.error
    return AdminApiError
