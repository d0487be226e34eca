"""The one place a failed search becomes a status: exception class -> transport-neutral ``Status``.

Owns the errors a search can end with that are not the search core's own (``UpstreamUnavailable``,
``UpstreamRejected``, ``UpstreamFailed``), the abstract ``Status`` every transport translates (gRPC codes in
``ets.service.server``; an HTTP front door maps the same values to 400 / 429 / 503 / 504 / 500), and
``status_for(exc)``: exception class -> status and client-facing message.
No transport library is imported here, so every transport shares this one mapping.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from ets.search.config import ConfigError
from ets.errors import FieldError
from ets.service.admission import QueueFull


# Internal locations in upstream error texts (URLs, host:port, ipv4:/ipv6: peers): logged, not sent.
_URL = re.compile(r"\b(?:https?|ipv4|ipv6|unix|dns):[^\s,;'\")]+")
_HOST_PORT = re.compile(r"\b(?:[A-Za-z][\w.-]*|\d{1,3}(?:\.\d{1,3}){3}):\d{2,5}\b")
# Python's socket addresses in OS errors: ('10.0.0.5', 30000) or ('::1', 30000, 0, 0).
_SOCKADDR = re.compile(r"\(\s*'[^']*',\s*\d{1,5}(?:,\s*\d+)*\s*\)")


def scrub(text: str) -> str:
    """``text`` without internal addresses (what a client may see of an upstream's error)."""
    return _SOCKADDR.sub("<address>", _HOST_PORT.sub("<address>", _URL.sub("<address>", text)))


class Status(enum.Enum):
    """How a search ended, independent of the transport (names equal gRPC's status codes)."""

    OK = "ok"
    INVALID_ARGUMENT = "invalid_argument"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    INTERNAL = "error"

    @property
    def outcome(self) -> str:
        """The ``outcome`` label of ``ets_search_searches_total`` (see ``ets.service.metrics``)."""
        return self.value


class UpstreamUnavailable(Exception):
    """The policy or the reward server could not serve a call (UNAVAILABLE)."""

    def __init__(self, upstream: str, address: str, detail: str) -> None:
        super().__init__(f"{upstream} server unavailable at {address}: {detail}")
        self.upstream = upstream
        self.address = address
        self.detail = detail


class _UpstreamAnswered(Exception):
    """An upstream answered a call with an error: which upstream, its detail, and the status the
    search ends with (the client message is the exception's text, scrubbed)."""

    def __init__(self, message: str, upstream: str, detail: str, status: Status) -> None:
        super().__init__(message)
        self.upstream = upstream
        self.detail = detail
        self.status = status


class UpstreamRejected(_UpstreamAnswered):
    """An upstream refused the request itself (e.g. a PRM type the reward server does not serve,
    a prompt beyond the policy's context): the request's fault, INVALID_ARGUMENT."""

    def __init__(self, upstream: str, detail: str, status: Status = Status.INVALID_ARGUMENT) -> None:
        super().__init__(f"{upstream} server rejected the request: {detail}", upstream, detail, status)


class UpstreamFailed(_UpstreamAnswered):
    """An upstream answered with an error that is neither "down" nor "your request": it keeps its
    class (INTERNAL, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED), so clients retry only what is
    retryable instead of re-running a search that fails the same way (UNAVAILABLE is retried)."""

    def __init__(self, upstream: str, detail: str, status: Status = Status.INTERNAL) -> None:
        super().__init__(f"{upstream} server failed: {detail}", upstream, detail, status)


@dataclass(frozen=True)
class Failure:
    """A search's failure as clients see it."""

    status: Status
    message: str


def status_for(exc: BaseException) -> Failure:
    """The status and client message for a search that raised ``exc``, by exception class (checked
    in order: ConfigError before its base FieldError); anything unexpected is INTERNAL with the
    exception's type and text (never a stack trace)."""
    if isinstance(exc, ConfigError):
        # The search core names fields by their config name; requests name them config.<field>.
        return Failure(Status.INVALID_ARGUMENT, f"config.{exc.field}: {exc.message}")
    if isinstance(exc, FieldError):
        return Failure(Status.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, QueueFull):
        return Failure(Status.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, UpstreamUnavailable):
        # The address stays in the logs; clients learn which upstream, not where it lives.
        return Failure(Status.UNAVAILABLE, scrub(f"{exc.upstream} server unavailable: {exc.detail}"))
    if isinstance(exc, _UpstreamAnswered):
        return Failure(exc.status, scrub(str(exc)))
    if isinstance(exc, TimeoutError):
        return Failure(Status.DEADLINE_EXCEEDED, str(exc) or "search did not finish before the deadline")
    return Failure(Status.INTERNAL, scrub(f"search failed: {type(exc).__name__}: {exc}"))
