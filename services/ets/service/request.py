"""Transport-neutral request checks: the problem text and the config overrides a request set.

Owns ``RequestError`` (field named as ``problem`` or ``config.<name>``), ``Limits`` (the operator's
caps as the runner applies them; their values and variable names are ``ServiceSettings``'
declarations, ``ServiceSettings.limits()``) and the rules every transport's request passes once,
in the runner, before a search is admitted: the result is a ``ValidConfig`` that the search loop
does not check again. Transports parse their own wire format into a plain mapping of
``SearchConfig`` field names (``ets.service.convert`` for the proto, ``ets.service.openai_request``
for the HTTP body).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ets.search.config import MAX_TOKENS_LIMIT, ConfigError, SearchConfig, ValidConfig
from ets.errors import FieldError
from ets.config import validate

# A problem longer than this is refused before it reaches the tokenizer (a guard, not a limit of
# the method: MATH500's longest problem is ~4 KB).
MAX_PROBLEM_CHARS = 64_000
# request_id goes into logs and responses: short, printable ASCII without spaces (no newline or
# control character can forge a log line; ets eval's ids carry labels like "ets[cluster_distance=0.3]").
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID = re.compile(r"[!-~]*")


@dataclass(frozen=True)
class Limits:
    """The operator's caps on what one request may ask for: memory and time are bounded by
    configuration, not by clients. Built by ``ServiceSettings.limits()`` (values and variable
    names declared once, there); ``settings`` maps each cap to the variable errors name."""

    width: int
    max_tokens: int
    max_depth: int
    solver_time_limit_s: float
    generated_tokens: int
    search_s: float
    # How long one upstream call of a search may keep retrying (ets.retry; the deadline bounds it too).
    retry_s: float = math.inf
    settings: Mapping[str, str] = field(default_factory=dict)

    def setting(self, cap: str) -> str:
        """The variable that sets ``cap`` (e.g. ``ETS_LIMIT_WIDTH`` for ``width``)."""
        return self.settings.get(cap, cap)

    def check(self, config: ValidConfig) -> ValidConfig:
        """``config`` if within every cap, else ``RequestError`` naming the field and the setting."""
        for name in ("width", "max_tokens", "max_depth", "solver_time_limit_s"):
            value, cap = getattr(config, name), getattr(self, name)
            if value > cap:
                raise RequestError(f"config.{name}",
                                   f"must be at most {cap:g} on this server ({self.setting(name)}), got {value:g}")
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


def resolve_config(overrides: Mapping[str, Any], defaults: SearchConfig, limits: Limits | None = None) -> ValidConfig:
    """The request's config fields over the server defaults, validated and within the operator's
    ``limits`` (``RequestError``)."""
    try:
        config = validate(defaults.replace(**overrides))
    except ConfigError as err:
        raise RequestError(f"config.{err.field}", err.message) from None
    return config if limits is None else limits.check(config)


def with_new_token_budget(config: ValidConfig, prompt_tokens: int, max_new_tokens: int,
                          limits: Limits | None = None) -> ValidConfig:
    """``config`` with a per-trajectory budget of ``max_new_tokens`` generated tokens (OpenAI's
    ``max_tokens``) turned into ``max_tokens``, which counts the ``prompt_tokens`` of the root too;
    only the rules that involve ``max_tokens`` are checked again, and the operator's cap.
    ``RequestError`` names ``max_tokens`` (the field the client set)."""
    if max_new_tokens < 1:
        raise RequestError("max_tokens", f"must be at least 1, got {max_new_tokens}")
    total = prompt_tokens + max_new_tokens
    if total > MAX_TOKENS_LIMIT:
        raise RequestError("max_tokens", f"the prompt ({prompt_tokens} tokens) plus {max_new_tokens} new tokens "
                           f"exceeds {MAX_TOKENS_LIMIT} tokens per trajectory")
    try:
        config = config.with_max_tokens(total)
    except ConfigError as err:
        raise RequestError("max_tokens", err.message) from None
    if limits is not None and total > limits.max_tokens:
        raise RequestError("max_tokens", f"the prompt ({prompt_tokens} tokens) plus {max_new_tokens} new tokens "
                           f"exceeds this server's {limits.max_tokens} tokens per trajectory "
                           f"({limits.setting('max_tokens')})")
    return config
