"""Transport-neutral request checks: the problem text and the config overrides a request set.

Owns ``RequestError`` (field named as ``problem`` or ``config.<name>``) and the rules every
transport applies before a search is admitted. Transports parse their own wire format into a
plain mapping of ``SearchConfig`` field names (``ets.service.convert`` for the proto).
"""
from __future__ import annotations

from typing import Any, Mapping

from ets.config import MAX_TOKENS_LIMIT, ConfigError, SearchConfig
from ets.errors import FieldError
from ets.search.selection import validate

# A problem longer than this is refused before it reaches the tokenizer (a guard, not a limit of
# the method: MATH500's longest problem is ~4 KB).
MAX_PROBLEM_CHARS = 64_000


class RequestError(FieldError):
    """Bad request content; ``field`` is the request field path (e.g. ``config.width``)."""


def validate_problem(problem: str) -> str:
    text = problem.strip()
    if not text:
        raise RequestError("problem", "must not be empty")
    if len(problem) > MAX_PROBLEM_CHARS:
        raise RequestError("problem", f"must be at most {MAX_PROBLEM_CHARS} characters, got {len(problem)}")
    return problem


def resolve_config(overrides: Mapping[str, Any], defaults: SearchConfig) -> SearchConfig:
    """The request's config fields over the server defaults, validated (``RequestError``)."""
    try:
        config = validate(defaults.replace(**overrides))
    except ConfigError as err:
        raise RequestError(f"config.{err.field}", err.message) from None
    return config


def with_new_token_budget(config: SearchConfig, prompt_tokens: int, max_new_tokens: int) -> SearchConfig:
    """``config`` with a per-trajectory budget of ``max_new_tokens`` generated tokens (OpenAI's
    ``max_tokens``) turned into ``max_tokens``, which counts the ``prompt_tokens`` of the root too.
    ``RequestError`` names ``max_tokens`` (the field the client set)."""
    if max_new_tokens < 1:
        raise RequestError("max_tokens", f"must be at least 1, got {max_new_tokens}")
    total = prompt_tokens + max_new_tokens
    if total > MAX_TOKENS_LIMIT:
        raise RequestError("max_tokens", f"the prompt ({prompt_tokens} tokens) plus {max_new_tokens} new tokens "
                           f"exceeds {MAX_TOKENS_LIMIT} tokens per trajectory")
    try:
        return validate(config.replace(max_tokens=total))
    except ConfigError as err:
        raise RequestError("max_tokens", err.message) from None
