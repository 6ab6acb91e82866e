"""Domain errors raised below the service layer; `service` maps them to gRPC status codes in one table.

Each carries the field it is about (when there is one) so the client can act on it.
"""
from __future__ import annotations


class SearchrecError(Exception):
    """Base of the errors that reach callers with a specific status code."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgument(SearchrecError):
    """A request field is malformed or out of range."""


class NotFound(SearchrecError):
    """A referenced entity (item, user) does not exist."""


class Overloaded(SearchrecError):
    """The work queue is full; the caller should back off and retry."""


class DeadlineExpired(SearchrecError):
    """The caller's deadline passed before the work could be computed."""


class FailedPrecondition(SearchrecError):
    """The system is not in a state to do this (for example a broken bundle was offered)."""


class Unavailable(SearchrecError):
    """The server is shutting down or has nothing to serve."""


class Unimplemented(SearchrecError):
    """The RPC exists in the contract but is not built yet."""


class PermissionDenied(SearchrecError):
    """The caller is known but may not touch this object (e.g. another advertiser's campaign)."""
