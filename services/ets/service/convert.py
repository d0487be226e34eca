"""Conversions between the gRPC messages and the search core's types (no I/O).

Owns: the proto ``SearchConfig`` -> the overrides it sets (checked once, by the runner, through
``ets.service.request``) and -> ``ets.config.SearchConfig`` on top of the server defaults (unset
fields keep the defaults), the resolved config back to proto, ``DepthReport`` ->
``DepthProgress``, and a ``ServedSearch`` -> ``SearchResponse``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from ets.api.v1 import search_pb2
from ets.config import SearchConfig
from ets.search.loop import DepthReport
from ets.service.request import RequestError
from ets.service.runner import ServedSearch

__all__ = ["RequestError", "config_overrides", "config_to_proto", "progress_to_proto",
           "response_to_proto"]

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(SearchConfig)}
_PROTO_FIELDS = {f.name for f in search_pb2.SearchConfig.DESCRIPTOR.fields}
# The proto and the dataclass are one contract: fail at import, not per request, if they drift.
if _CONFIG_FIELDS != _PROTO_FIELDS:  # pragma: no cover - a build error, caught by any test import
    raise ImportError(
        "proto SearchConfig and ets.config.SearchConfig disagree: "
        f"only in proto {sorted(_PROTO_FIELDS - _CONFIG_FIELDS)}, "
        f"only in config {sorted(_CONFIG_FIELDS - _PROTO_FIELDS)}"
    )


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
    values = dataclasses.asdict(config.resolved())
    return search_pb2.SearchConfig(**{k: v for k, v in values.items() if v is not None})


def progress_to_proto(report: DepthReport) -> search_pb2.DepthProgress:
    """A loop ``DepthReport`` as a stream event payload."""
    return search_pb2.DepthProgress(
        depth=int(report.depth),
        frontier_size=int(report.frontier_size),
        kept_candidates=int(report.kept_candidates),
        kv_tokens=int(report.kv_tokens),
        elapsed_seconds=float(report.elapsed_seconds),
        remaining_width=int(report.remaining_width),
        finished=int(report.finished),
        generated_tokens=int(getattr(report, "generated_tokens", 0)),
    )


def response_to_proto(served: ServedSearch, request_id: str = "") -> search_pb2.SearchResponse:
    """A served search as the RPC's response."""
    stats = served.result.stats
    candidates = [
        search_pb2.Candidate(
            text=c.text, answer=c.answer, step_scores=list(c.step_scores), aggregate_score=float(c.aggregate_score),
            finish_reason=c.finish_reason, depth=int(c.depth), tokens=int(c.tokens),
        )
        for c in served.candidates
    ]
    response = search_pb2.SearchResponse(
        request_id=request_id,
        answer=served.answer,
        candidates=candidates,
        stats=search_pb2.SearchStats(
            total_kv_tokens=int(stats.total_kv_tokens),
            peak_kv_tokens=int(stats.peak_kv_tokens),
            model_calls=int(stats.model_calls),
            generated_tokens=int(stats.generated_tokens),
            prompt_tokens=int(stats.prompt_tokens),
            cached_prompt_tokens=int(stats.cached_prompt_tokens),
            selection_seconds=float(stats.selection_seconds),
            depth_reached=int(stats.depth_reached),
            # The service's wall time includes formatting/tokenizing the root and answer voting.
            wall_seconds=float(served.wall_seconds),
            selections=int(stats.selections),
            solver_fallbacks=int(stats.solver_fallbacks),
            policy_seconds=float(stats.policy_seconds),
            reward_seconds=float(stats.reward_seconds),
            stopped_early=bool(stats.stopped_early),
            width_left=int(stats.width_left),
        ),
        config=config_to_proto(served.config),
        grouping_fallback=served.grouping_fallback,
        votes=[search_pb2.AnswerVote(answer=v.answer, trajectories=int(v.trajectories), vote=float(v.vote),
                                     best_score=float(v.best_score)) for v in served.votes],
    )
    if served.best_index is not None:
        response.best.CopyFrom(candidates[served.best_index])
    return response


def omit_candidates(response: search_pb2.SearchResponse) -> None:
    """Keep only the answer, the best trajectory and the statistics (summary_only, or too large)."""
    del response.candidates[:]
    response.candidates_omitted = True
