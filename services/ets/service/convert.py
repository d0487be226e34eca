"""Conversions between the gRPC messages and the search core's types (no I/O).

Owns: the proto ``SearchConfig`` -> the overrides it sets (``config_overrides``; checked once, by
the runner, through ``ets.service.request``), the resolved config back to proto
(``config_to_proto``), ``DepthReport`` -> ``DepthProgress`` (``progress_to_proto``), and a
``ServedSearch`` -> ``SearchResponse`` (``response_to_proto``).

Every message the core fills is filled field by field from its dataclass by name (``_message``),
and ``CONTRACTS`` pairs each message with its dataclass: the import fails when one has a field
the other lacks, so a statistic added to the core cannot silently miss the gRPC clients.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from ets.api.v1 import search_pb2
from ets.search.answers import AnswerVote
from ets.search.config import SearchConfig
from ets.search.loop import DepthReport, SearchStats
from ets.service.request import RequestError
from ets.search.pipeline import ServedCandidate, ServedSearch

__all__ = ["CONTRACTS", "RequestError", "config_overrides", "config_to_proto", "progress_to_proto",
           "response_to_proto"]

# Each proto message and the core dataclass that fills it: one contract each.
CONTRACTS: tuple[tuple[type[Message], type[Any]], ...] = (
    (search_pb2.SearchConfig, SearchConfig),
    (search_pb2.SearchStats, SearchStats),
    (search_pb2.DepthProgress, DepthReport),
    (search_pb2.Candidate, ServedCandidate),
    (search_pb2.AnswerVote, AnswerVote),
)


def contract_drift(message: type[Message], data: type[Any]) -> str:
    """How ``message``'s fields and dataclass ``data``'s differ ("" when they are the same names)."""
    proto = {f.name for f in message.DESCRIPTOR.fields}
    core = {f.name for f in dataclasses.fields(data)}
    if proto == core:
        return ""
    return (f"proto {message.DESCRIPTOR.name} and {data.__module__}.{data.__qualname__} disagree: "
            f"only in proto {sorted(proto - core)}, only in the core {sorted(core - proto)}")


# The proto and the dataclasses are one contract: fail at import, not per request, if they drift.
_DRIFT = [d for d in (contract_drift(m, c) for m, c in CONTRACTS) if d]
if _DRIFT:  # pragma: no cover - a build error, caught by any test import
    raise ImportError("; ".join(_DRIFT))


def _message(message: type[Message], value: Any, **override: Any) -> Any:
    """``message`` with every field taken by name from the dataclass ``value`` (``override`` wins);
    ``None`` leaves a field unset (an optional field keeps its absence)."""
    fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    fields.update(override)
    return message(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items() if v is not None})


def config_overrides(message: search_pb2.SearchConfig) -> dict[str, Any]:
    """The fields a request set: ``optional`` scalars by presence, strings when non-empty."""
    overrides: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if field.has_presence:
            if message.HasField(field.name):
                overrides[field.name] = getattr(message, field.name)
        else:
            value = getattr(message, field.name)
            if field.type == FieldDescriptor.TYPE_STRING:
                value = value.strip()
            if value != "":
                overrides[field.name] = value
    return overrides


def config_to_proto(config: SearchConfig) -> search_pb2.SearchConfig:
    """The resolved config as sent back in ``SearchResponse.config`` (every field set)."""
    return _message(search_pb2.SearchConfig, config.resolved())


def progress_to_proto(report: DepthReport) -> search_pb2.DepthProgress:
    """A loop ``DepthReport`` as a stream event payload."""
    return _message(search_pb2.DepthProgress, report)


def response_to_proto(served: ServedSearch, request_id: str = "") -> search_pb2.SearchResponse:
    """A served search as the RPC's response."""
    candidates = [_message(search_pb2.Candidate, c) for c in served.candidates]
    response = search_pb2.SearchResponse(
        request_id=request_id,
        answer=served.answer,
        candidates=candidates,
        # The service's wall time includes formatting/tokenizing the root and answer voting.
        stats=_message(search_pb2.SearchStats, served.result.stats, wall_seconds=served.wall_seconds),
        config=config_to_proto(served.config),
        grouping_fallback=served.grouping_fallback,
        votes=[_message(search_pb2.AnswerVote, v) for v in served.votes],
    )
    if served.best_index is not None:
        response.best.CopyFrom(candidates[served.best_index])
    return response


def omit_candidates(response: search_pb2.SearchResponse) -> None:
    """Keep only the answer, the best trajectory and the statistics (summary_only, or too large)."""
    del response.candidates[:]
    response.candidates_omitted = True
