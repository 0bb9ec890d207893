"""Rich gRPC errors (google.rpc.Status with details) built with grpcio-status.

Envoy's transcoder (``convert_grpc_status: true``) turns them into HTTP 400/404/503 JSON bodies.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

#: The ErrorInfo domain of every optmon error.
ERROR_DOMAIN = "optmon.v1"


class FieldViolations(Exception):
    """Collects ``(field, description)`` pairs of a malformed request; raised as one INVALID_ARGUMENT."""

    def __init__(self) -> None:
        super().__init__("invalid request")
        self.violations: list[tuple[str, str]] = []

    def add(self, field: str, description: str) -> None:
        """Record one violation, e.g. ``add("strikes_around_atm", "must be in 1..50, got 80")``."""
        self.violations.append((field, description))

    def __bool__(self) -> bool:
        return bool(self.violations)

    def raise_if_any(self) -> None:
        """Raise ``self`` when at least one violation was recorded."""
        if self.violations:
            raise self


class NotFound(Exception):
    """An unknown underlying, expiry or a time with no data. ``reason`` is an upper-case code, e.g.
    ``UNKNOWN_UNDERLYING``; ``metadata`` names what was not found."""

    def __init__(self, reason: str, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata = metadata


class Unavailable(Exception):
    """A dependency (PostgreSQL, Redis) is down and no answer can be given."""


def invalid_argument_status(violations: Iterable[tuple[str, str]], message: str = "invalid request") -> grpc.Status:
    """A ``grpc.Status`` for INVALID_ARGUMENT carrying a ``google.rpc.BadRequest``."""
    bad = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations]
    )
    detail = any_pb2.Any()
    detail.Pack(bad)
    text = message + ": " + "; ".join(f"{v.field}: {v.description}" for v in bad.field_violations)
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=text, details=[detail]))


def not_found_status(err: NotFound) -> grpc.Status:
    """A ``grpc.Status`` for NOT_FOUND carrying a ``google.rpc.ErrorInfo``."""
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN, metadata=err.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.NOT_FOUND, message=err.message, details=[detail]))


def unavailable_status(message: str) -> grpc.Status:
    """A ``grpc.Status`` for UNAVAILABLE."""
    info = error_details_pb2.ErrorInfo(reason="DEPENDENCY_UNAVAILABLE", domain=ERROR_DOMAIN)
    detail = any_pb2.Any()
    detail.Pack(info)
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.UNAVAILABLE, message=message, details=[detail]))


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:  # type: ignore[type-arg]
    """Abort the RPC with the rich status matching a domain exception; re-raise anything else."""
    if isinstance(exc, FieldViolations):
        await context.abort_with_status(invalid_argument_status(exc.violations))
    elif isinstance(exc, NotFound):
        await context.abort_with_status(not_found_status(exc))
    elif isinstance(exc, Unavailable):
        await context.abort_with_status(unavailable_status(str(exc)))
    raise exc
