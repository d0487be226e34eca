"""Transport-neutral request checks: the problem text and the config overrides a request set.

Owns ``RequestError`` (field named as ``problem`` or ``config.<name>``) and the rules every
transport applies before a search is admitted. Transports parse their own wire format into a
plain mapping of ``SearchConfig`` field names (``ets.service.convert`` for the proto).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from ets.config import MAX_TOKENS_LIMIT, ConfigError, SearchConfig
from ets.errors import FieldError
from ets.search.selection import validate

# A problem longer than this is refused before it reaches the tokenizer (a guard, not a limit of
# the method: MATH500's longest problem is ~4 KB).
MAX_PROBLEM_CHARS = 64_000
# request_id goes into logs and responses: short, printable ASCII without spaces (no newline or
# control character can forge a log line; ets eval's ids carry labels like "ets[cluster_distance=0.3]").
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID = re.compile(r"[!-~]*")


@dataclass(frozen=True)
class Limits:
    """The operator's caps on what one request may ask for (``ServiceSettings``' ETS_LIMIT_*,
    ETS_MAX_SOLVER_TIME_LIMIT_S): memory and time are bounded by configuration, not by clients."""

    width: int = 256
    max_tokens: int = 8192
    max_depth: int = 100
    solver_time_limit_s: float = 2.0
    generated_tokens: int = 1_000_000
    search_s: float = 900.0

    def check(self, config: SearchConfig) -> SearchConfig:
        """``config`` if within every cap, else ``RequestError`` naming the field and the setting."""
        for field, value, cap, env in (
            ("width", config.width, self.width, "ETS_LIMIT_WIDTH"),
            ("max_tokens", config.max_tokens, self.max_tokens, "ETS_LIMIT_MAX_TOKENS"),
            ("max_depth", config.max_depth, self.max_depth, "ETS_LIMIT_MAX_DEPTH"),
            ("solver_time_limit_s", config.solver_time_limit_s, self.solver_time_limit_s,
             "ETS_MAX_SOLVER_TIME_LIMIT_S"),
        ):
            if value > cap:
                raise RequestError(f"config.{field}", f"must be at most {cap:g} on this server ({env}), got {value:g}")
        return config


class RequestError(FieldError):
    """Bad request content; ``field`` is the request field path (e.g. ``config.width``)."""


def validate_problem(problem: str) -> str:
    text = problem.strip()
    if not text:
        raise RequestError("problem", "must not be empty")
    if len(problem) > MAX_PROBLEM_CHARS:
        raise RequestError("problem", f"must be at most {MAX_PROBLEM_CHARS} characters, got {len(problem)}")
    return problem


def validate_request_id(request_id: str) -> str:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestError("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters, got {len(request_id)}")
    if not _REQUEST_ID.fullmatch(request_id):
        raise RequestError("request_id", "must be printable ASCII without spaces")
    return request_id


def resolve_config(overrides: Mapping[str, Any], defaults: SearchConfig, limits: Limits | None = None) -> SearchConfig:
    """The request's config fields over the server defaults, validated and within the operator's
    ``limits`` (``RequestError``)."""
    try:
        config = validate(defaults.replace(**overrides))
    except ConfigError as err:
        raise RequestError(f"config.{err.field}", err.message) from None
    return config if limits is None else limits.check(config)


def with_new_token_budget(config: SearchConfig, prompt_tokens: int, max_new_tokens: int,
                          limits: Limits | None = None) -> SearchConfig:
    """``config`` with a per-trajectory budget of ``max_new_tokens`` generated tokens (OpenAI's
    ``max_tokens``) turned into ``max_tokens``, which counts the ``prompt_tokens`` of the root too;
    the operator's caps apply to the result. ``RequestError`` names ``max_tokens`` (the field the
    client set)."""
    if max_new_tokens < 1:
        raise RequestError("max_tokens", f"must be at least 1, got {max_new_tokens}")
    total = prompt_tokens + max_new_tokens
    if total > MAX_TOKENS_LIMIT:
        raise RequestError("max_tokens", f"the prompt ({prompt_tokens} tokens) plus {max_new_tokens} new tokens "
                           f"exceeds {MAX_TOKENS_LIMIT} tokens per trajectory")
    try:
        config = validate(config.replace(max_tokens=total))
    except ConfigError as err:
        raise RequestError("max_tokens", err.message) from None
    if limits is not None and total > limits.max_tokens:
        raise RequestError("max_tokens", f"the prompt ({prompt_tokens} tokens) plus {max_new_tokens} new tokens "
                           f"exceeds this server's {limits.max_tokens} tokens per trajectory (ETS_LIMIT_MAX_TOKENS)")
    return config
