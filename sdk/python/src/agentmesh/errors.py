"""Errors: every failed call raises an :class:`AgentmeshError` carrying the gRPC status code,
the message, the field violations of an ``INVALID_ARGUMENT`` (``google.rpc.BadRequest``) and the
delay a ``RESOURCE_EXHAUSTED`` asks for (``google.rpc.RetryInfo``)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, e.g. ``open.max_in_flight``: ``1–10000``."""

    field: str
    description: str


class AgentmeshError(Exception):
    """A call that failed: ``code`` (a :class:`grpc.StatusCode`), ``message``, ``violations``
    (for ``INVALID_ARGUMENT``), ``retry_delay`` in seconds (when the service asked for one)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        violations: tuple[FieldViolation, ...] = (),
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.violations = violations
        self.retry_delay = retry_delay


class InvalidArgument(AgentmeshError):
    """The request is invalid; ``violations`` names every bad field."""


class NotFound(AgentmeshError):
    """No such task, agent, rule, key, …"""


class FailedPrecondition(AgentmeshError):
    """The state does not allow it (a stale version or epoch, …)."""


class ResourceExhausted(AgentmeshError):
    """Over a limit, or no capacity now; ``retry_delay`` says when to try again if known."""


class Unavailable(AgentmeshError):
    """The service cannot be reached or cannot answer now: safe to retry idempotent calls."""


class DeadlineExceeded(AgentmeshError):
    """No answer within the call's deadline."""


class Unauthenticated(AgentmeshError):
    """No token (or client certificate), or an invalid one."""


class PermissionDenied(AgentmeshError):
    """The caller's role or tenant may not do this."""


class Unimplemented(AgentmeshError):
    """Not built (yet) by this server."""


_BY_CODE: dict[grpc.StatusCode, type[AgentmeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
}


def from_rpc_error(error: grpc.RpcError) -> AgentmeshError:
    """The :class:`AgentmeshError` (a subclass by code) for a failed gRPC call, with the details
    of ``grpc-status-details-bin`` decoded."""
    code: grpc.StatusCode = error.code()
    message: str = error.details() or ""
    violations: list[FieldViolation] = []
    retry_delay: float | None = None
    trailers = error.trailing_metadata() or ()
    for key, value in trailers:
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.extend(
                    FieldViolation(v.field, v.description) for v in bad.field_violations
                )
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                retry_delay = info.retry_delay.ToTimedelta().total_seconds()
    kind = _BY_CODE.get(code, AgentmeshError)
    return kind(code, message, tuple(violations), retry_delay)
