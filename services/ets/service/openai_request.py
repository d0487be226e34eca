"""OpenAI chat-completion requests -> one search (pure: no I/O, no HTTP library).

Owns how a ``POST /v1/chat/completions`` body and its ``X-ETS-<Field>`` headers become a
``ChatSearch`` (what the HTTP transport hands the runner) and which request field every error
names (``param`` of the OpenAI error):

- the last ``user`` message is the problem; ``system`` / ``developer`` messages (joined) are the
  system prompt for the policy's chat template (chat-style policy model types only);
- ``model`` is the policy model, or a method alias (``ets``, ``rebase``, ``beam``, ``dvts``,
  ``best_of_n``: the method registry's names) that sets ``method``;
- ``temperature`` and ``seed`` map to the search config; ``max_tokens`` /
  ``max_completion_tokens`` are OpenAI's *new tokens per trajectory*, carried as
  ``max_new_tokens`` (the runner adds the root prompt's length: our ``max_tokens`` counts it);
- every other search field comes from the ``ets`` object (what ``extra_body={"ets": {...}}``
  sends) or an ``X-ETS-<Field>`` header (``X-ETS-Lambda-C`` or ``X-ETS-Lambda_C``); the body wins
  over headers, headers over the server defaults; unknown fields and headers are errors;
- ``n > 1`` and other parameters a search cannot honour are refused, naming them.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from ets.config import SearchConfig
from ets.search.selection import METHODS
from ets.service.request import RequestError

HEADER_PREFIX = "x-ets-"
# Models a client may name besides the policy model: one per registered method.
METHOD_ALIASES: tuple[str, ...] = tuple(METHODS)

_CONFIG_TYPES: dict[str, Any] = typing.get_type_hints(SearchConfig)
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(SearchConfig))
# ``ets`` fields that are not search config: how the result is returned and how long it may take.
_OPTION_TYPES: dict[str, Any] = {
    "candidates": bool,           # every candidate with its scores in the response's ets object
    "timeout_s": float | None,    # the search's deadline (OpenAI requests carry none)
    "request_id": str,            # logged and echoed; default: the completion's id
}
_ETS_TYPES = {**_CONFIG_TYPES, **_OPTION_TYPES}
# The top-level OpenAI parameters that map to search config fields.
_TOP_LEVEL_CONFIG = ("temperature", "seed")


@dataclass
class ChatSearch:
    """A chat-completion request as one search; ``params`` maps each config field to the request
    field that set it (``ets.width``, ``X-ETS-Width``, ``temperature``), for error messages."""

    model: str
    problem: str
    system_prompt: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False
    candidates: bool = False
    timeout_s: float | None = None
    request_id: str = ""
    params: dict[str, str] = field(default_factory=dict)

    def param(self, name: str) -> str:
        """The request field behind ``name`` (a config field, ``config.<field>`` or a top-level name)."""
        short = name.removeprefix("config.")
        if short in self.params:
            return self.params[short]
        return f"ets.{short}" if short in _ETS_TYPES else name


def _type_name(tp: Any) -> str:
    base = _optional_inner(tp)
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(base, str(base))


def _optional_inner(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 and type(None) in typing.get_args(tp) else tp


def _typed(value: Any, tp: Any, param: str) -> Any:
    """A JSON value checked against the field's type (ints are numbers; bools are not ints)."""
    base = _optional_inner(tp)
    if value is None:
        if base is not tp:
            return None
        raise RequestError(param, f"must be {_type_name(tp)}, got null")
    ok = (isinstance(value, bool) if base is bool
          else isinstance(value, int) and not isinstance(value, bool) if base is int
          else isinstance(value, (int, float)) and not isinstance(value, bool) if base is float
          else isinstance(value, str) if base is str else False)
    if not ok:
        raise RequestError(param, f"must be {_type_name(tp)}, got {value!r}")
    if base is float:
        value = float(value)
        if not math.isfinite(value):
            raise RequestError(param, f"must be a finite number, got {value!r}")
    return value


def _from_text(text: str, tp: Any, param: str) -> Any:
    """A header's text parsed as the field's type (``none``/``null`` unsets an optional field)."""
    from ets.settings import parse_as

    base = _optional_inner(tp)
    if base is not tp and text.strip().lower() in ("none", "null"):
        return None
    try:
        return parse_as(base, text.strip())
    except ValueError as err:
        raise RequestError(param, str(err)) from None


def header_values(headers: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    """``X-ETS-<Field>`` headers: field -> (header name as sent, value); unknown ones are errors."""
    out: dict[str, tuple[str, Any]] = {}
    for name, text in headers.items():
        if not name.lower().startswith(HEADER_PREFIX):
            continue
        key = name[len(HEADER_PREFIX):].lower().replace("-", "_")
        # HTTP/1.1 servers hand header names over lower-cased: name it the way the docs spell it.
        shown = "X-ETS-" + "-".join(part.capitalize() for part in name[len(HEADER_PREFIX):].split("-"))
        if key not in _ETS_TYPES:
            raise RequestError(shown, f"unknown search field {key!r}; expected one of {sorted(_ETS_TYPES)}")
        out[key] = (shown, _from_text(text, _ETS_TYPES[key], shown))
    return out


def _content(message: Mapping[str, Any], param: str) -> str:
    """A message's text: a string, or the text parts of a content list."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{param}[{i}]", 'only text parts are supported ({"type": "text", "text": ...})')
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(param, f"must be a string or a list of text parts, got {type(content).__name__}")


def _messages(body: Mapping[str, Any]) -> tuple[str, str | None]:
    """(problem, system prompt) from ``messages``."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", "must be a non-empty list of {role, content} messages")
    problem: str | None = None
    system: list[str] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}]", "must be an object with a string role")
        role = m["role"]
        if role == "user":
            problem = _content(m, f"messages[{i}].content")
        elif role in ("system", "developer"):
            system.append(_content(m, f"messages[{i}].content"))
        # Assistant and tool turns are not part of a search's root: one problem, one search.
    if problem is None:
        raise RequestError("messages", "needs a user message (the problem to search on)")
    return problem, ("\n\n".join(system) if system else None)


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise RequestError("n", f"a search returns one answer: n must be 1, got {n!r} (ask for "
                           "ets.candidates to get every candidate)")
    if body.get("logprobs"):
        raise RequestError("logprobs", "not available from a search")
    for name in ("tools", "functions"):
        if body.get(name):
            raise RequestError(name, "tool calling is not available from a search")
    fmt = body.get("response_format")
    if isinstance(fmt, Mapping) and fmt.get("type", "text") != "text":
        raise RequestError("response_format", "only text responses are available from a search")
    top_p = body.get("top_p")
    if top_p is not None and top_p != 1:
        raise RequestError("top_p", f"not supported by the search (it samples with temperature only), got {top_p!r}")


def _new_tokens(body: Mapping[str, Any]) -> tuple[str, int] | None:
    """OpenAI's per-trajectory budget: ``max_completion_tokens`` or its older name ``max_tokens``."""
    found = [(k, _typed(body[k], int, k)) for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None]
    if len(found) == 2 and found[0][1] != found[1][1]:
        raise RequestError("max_tokens", "max_tokens and max_completion_tokens differ; set one")
    if not found:
        return None
    name, value = found[0]
    if value < 1:
        raise RequestError(name, f"must be at least 1, got {value}")
    return name, value


def parse_chat(body: Any, headers: Mapping[str, str], policy_model: str) -> ChatSearch:
    """The search a chat-completion request asks for (``RequestError`` naming the field)."""
    if not isinstance(body, Mapping):
        raise RequestError("body", "must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("model", "must name the policy model or a search method")
    if model != policy_model and model not in METHOD_ALIASES:
        raise RequestError("model", f"unknown model {model!r}; expected {[policy_model, *METHOD_ALIASES]}")
    _refuse_unsupported(body)
    problem, system = _messages(body)
    stream = False if body.get("stream") is None else _typed(body["stream"], bool, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, Mapping):
            raise RequestError("stream_options", "must be an object")
        include_usage = bool(_typed(options.get("include_usage", False), bool, "stream_options.include_usage"))

    # Lowest precedence first: headers, then the body (top level, then the ets object).
    values: dict[str, Any] = {}
    params: dict[str, str] = {}
    for key, (shown, value) in header_values(headers).items():
        values[key], params[key] = value, shown
    from_body: dict[str, tuple[str, Any]] = {}
    if model in METHOD_ALIASES:
        from_body["method"] = ("model", model)
    for key in _TOP_LEVEL_CONFIG:
        if body.get(key) is not None:
            from_body[key] = (key, _typed(body[key], _CONFIG_TYPES[key], key))
    ets = body.get("ets")
    if ets is not None and not isinstance(ets, Mapping):
        raise RequestError("ets", "must be an object of search fields")
    for key, raw in (ets or {}).items():
        param = f"ets.{key}"
        if key not in _ETS_TYPES:
            raise RequestError(param, f"unknown search field; expected one of {sorted(_ETS_TYPES)}")
        value = _typed(raw, _ETS_TYPES[key], param)
        if key in from_body and from_body[key][1] != value:
            raise RequestError(param, f"conflicts with {from_body[key][0]}={from_body[key][1]!r}")
        from_body[key] = (param, value)
    for key, (param, value) in from_body.items():
        values[key], params[key] = value, param

    budget = _new_tokens(body)
    if budget is not None:
        if "max_tokens" in from_body:
            raise RequestError(budget[0], "set either OpenAI's max_tokens (new tokens per trajectory) or "
                               "ets.max_tokens (tokens per trajectory including the prompt), not both")
        values.pop("max_tokens", None)  # a header's total budget yields to the body's
        params["max_tokens"] = budget[0]

    timeout = values.pop("timeout_s", None)
    if timeout is not None and timeout <= 0:
        raise RequestError(params["timeout_s"], f"must be positive, got {timeout}")
    return ChatSearch(
        model=model, problem=problem, system_prompt=system,
        overrides={k: v for k, v in values.items() if k in _CONFIG_FIELDS},
        max_new_tokens=None if budget is None else budget[1], stream=stream, include_usage=include_usage,
        candidates=bool(values.pop("candidates", False)), timeout_s=timeout,
        request_id=str(values.pop("request_id", "") or ""), params=params,
    )
