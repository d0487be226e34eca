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

The body's shape and types are pydantic models (``ChatRequest``; the ``ets`` object's model is
generated from ``SearchConfig``'s fields, strict: ints are numbers, bools are not ints; headers
go through the same fields in pydantic's lax mode, from text). ``_request_error`` turns the first
validation error into the ``RequestError`` every transport knows, the field named as the client
wrote it (``ets.width``, ``X-ETS-Width``, ``messages[0]``, ``stream_options.include_usage``).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic_core import ErrorDetails

from ets.search.config import SearchConfig
from ets.search.selection import METHODS
from ets.service.request import RequestError

HEADER_PREFIX = "x-ets-"
# Models a client may name besides the policy model: one per registered method.
METHOD_ALIASES: tuple[str, ...] = tuple(METHODS)

_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(SearchConfig))
# ``ets`` fields that are not search config: how the result is returned and how long it may take.
_OPTION_TYPES: dict[str, Any] = {
    "candidates": bool,           # every candidate with its scores in the response's ets object
    "timeout_s": float | None,    # the search's deadline (OpenAI requests carry none)
    "request_id": str,            # logged and echoed; default: the completion's id
}
_ETS_TYPES: dict[str, Any] = {**typing.get_type_hints(SearchConfig), **_OPTION_TYPES}
_ETS_NAMES = sorted(_ETS_TYPES)


# ---- the request models ------------------------------------------------------------------------

class _Strict(BaseModel):
    # JSON types as they are: an int is a number, a bool is no int, a string no number.
    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class _EtsBase(_Strict):
    model_config = ConfigDict(extra="forbid")


class _HeaderBase(BaseModel):
    # Header values are text: pydantic's lax mode parses them by the same field types.
    model_config = ConfigDict(allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _unset_optional(cls, data: Any) -> Any:
        """Values without surrounding whitespace; ``none`` / ``null`` unsets an optional field
        (``X-ETS-Lambda-S: none``)."""
        if not isinstance(data, dict):
            return data
        texts = {k: str(v).strip() for k, v in data.items()}
        return {k: None if _optional(k) and v.lower() in ("none", "null") else v for k, v in texts.items()}


def _optional(name: str) -> bool:
    return type(None) in typing.get_args(_ETS_TYPES.get(name))


# Every field defaults to None = "not set" (``model_fields_set`` says which were sent); an explicit
# null is validated, so it is refused for a field that cannot be None.
_ETS_FIELDS: dict[str, Any] = {name: (tp, None) for name, tp in _ETS_TYPES.items()}
EtsFields = create_model("EtsFields", __base__=_EtsBase, **_ETS_FIELDS)
EtsHeaders = create_model("EtsHeaders", __base__=_HeaderBase, **_ETS_FIELDS)


class StreamOptions(_Strict):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class Message(_Strict):
    # Only the user and system turns' content is read (``_content``); other turns pass as they are.
    model_config = ConfigDict(extra="allow")

    role: str
    content: Any = None


class ChatRequest(_Strict):
    """A ``POST /v1/chat/completions`` body; fields in the order they are checked. OpenAI
    parameters a search has no use for (``user``, ``presence_penalty``, ...) are accepted and
    ignored; those it cannot honour are refused by value (``_refuse_unsupported``)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    n: Any = None
    logprobs: Any = None
    tools: Any = None
    functions: Any = None
    response_format: Any = None
    top_p: Any = None
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # The top-level OpenAI parameters that map to search config fields (null: not set), in the ranges
    # OpenAI's API documents and enforces (temperature 0-2; ``ets.temperature`` is the search's own,
    # checked by SearchConfig's rules instead).
    temperature: float | None = Field(default=None, ge=0, le=2)
    seed: int | None = None
    # EtsFields is generated from SearchConfig at import: a value, to mypy, not a class.
    ets: EtsFields | None = None  # type: ignore[valid-type]
    max_completion_tokens: int | None = None
    max_tokens: int | None = None


_TOP_LEVEL_CONFIG = ("temperature", "seed")
# What a wrong shape means, by the top-level field (the type errors of scalars say it themselves).
_SHAPES = {
    "": ("body", "must be a JSON object"),
    "model": ("model", "must name the policy model or a search method"),
    "messages": ("messages", "must be a non-empty list of {role, content} messages"),
    "stream_options": ("stream_options", "must be an object"),
    "ets": ("ets", "must be an object of search fields"),
}
_KINDS = {"int": "an integer", "bool": "a boolean", "float": "a number", "string": "a string"}


def _request_error(exc: ValidationError, names: Mapping[str, str] | None = None) -> RequestError:
    """The first validation error as a ``RequestError`` naming the field as the client sent it;
    ``names``: the param of each top-level key (headers: the header's name)."""
    err = exc.errors(include_url=False)[0]
    loc = err["loc"]
    top = str(loc[0]) if loc else ""
    if names is not None:
        return RequestError(names.get(top, top), _message(err))
    if top == "messages" and len(loc) >= 2:
        return RequestError(f"messages[{loc[1]}]", "must be an object with a string role")
    if top in _SHAPES and (len(loc) <= 1 or top == "model"):
        return RequestError(*_SHAPES[top])
    return RequestError(".".join(str(part) for part in loc), _message(err))


def _message(err: ErrorDetails) -> str:
    got = "null" if err["input"] is None else repr(err["input"])
    kind = err["type"]
    if kind == "finite_number":
        return f"must be a finite number, got {got}"
    bounds = {"less_than_equal": ("le", "at most"), "greater_than_equal": ("ge", "at least")}
    if kind in bounds:
        key, words = bounds[kind]
        return f"must be {words} {float(err.get('ctx', {}).get(key, 0)):g} (OpenAI's range), got {got}"
    if kind == "extra_forbidden":
        return f"unknown search field; expected one of {_ETS_NAMES}"
    base = kind.removesuffix("_type").removesuffix("_parsing")
    if base in _KINDS:
        return f"must be {_KINDS[base]}, got {got}"
    return str(err["msg"])  # pydantic's own words for anything rarer


# ---- the search a request asks for --------------------------------------------------------------


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


def header_values(headers: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    """``X-ETS-<Field>`` headers: field -> (header name as sent, value); unknown ones are errors."""
    texts: dict[str, str] = {}
    shown: dict[str, str] = {}
    for name, text in headers.items():
        if not name.lower().startswith(HEADER_PREFIX):
            continue
        key = name[len(HEADER_PREFIX):].lower().replace("-", "_")
        # HTTP/1.1 servers hand header names over lower-cased: name it the way the docs spell it.
        shown[key] = "X-ETS-" + "-".join(part.capitalize() for part in name[len(HEADER_PREFIX):].split("-"))
        if key not in _ETS_TYPES:
            raise RequestError(shown[key], f"unknown search field {key!r}; expected one of {_ETS_NAMES}")
        texts[key] = text
    try:
        parsed = EtsHeaders.model_validate(texts)
    except ValidationError as err:
        raise _request_error(err, shown) from None
    return {key: (shown[key], getattr(parsed, key)) for key in texts}


def _content(message: Message, param: str) -> str:
    """A message's text: a string, or the text parts of a content list."""
    content = message.content
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


def _messages(messages: list[Message]) -> tuple[str, str | None]:
    """(problem, system prompt) from ``messages``."""
    problem: str | None = None
    system: list[str] = []
    for i, m in enumerate(messages):
        if m.role == "user":
            problem = _content(m, f"messages[{i}].content")
        elif m.role in ("system", "developer"):
            system.append(_content(m, f"messages[{i}].content"))
        # Assistant and tool turns are not part of a search's root: one problem, one search.
    if problem is None:
        raise RequestError("messages", "needs a user message (the problem to search on)")
    return problem, ("\n\n".join(system) if system else None)


def _refuse_unsupported(body: ChatRequest) -> None:
    if body.n is not None and body.n != 1:
        raise RequestError("n", f"a search returns one answer: n must be 1, got {body.n!r} (ask for "
                           "ets.candidates to get every candidate)")
    if body.logprobs:
        raise RequestError("logprobs", "not available from a search")
    for name in ("tools", "functions"):
        if getattr(body, name):
            raise RequestError(name, "tool calling is not available from a search")
    fmt = body.response_format
    if isinstance(fmt, Mapping) and fmt.get("type", "text") != "text":
        raise RequestError("response_format", "only text responses are available from a search")
    if body.top_p is not None and body.top_p != 1:
        raise RequestError("top_p", f"not supported by the search (it samples with temperature only), "
                           f"got {body.top_p!r}")


def _new_tokens(body: ChatRequest) -> tuple[str, int] | None:
    """OpenAI's per-trajectory budget: ``max_completion_tokens`` or its older name ``max_tokens``."""
    found = [(k, v) for k, v in (("max_completion_tokens", body.max_completion_tokens),
                                 ("max_tokens", body.max_tokens)) if v is not None]
    if len(found) == 2 and found[0][1] != found[1][1]:
        raise RequestError("max_tokens", "max_tokens and max_completion_tokens differ; set one")
    if not found:
        return None
    name, value = found[0]
    if value < 1:
        raise RequestError(name, f"must be at least 1, got {value}")
    return name, value


def parse_chat(body: Any, headers: Mapping[str, str], policy_models: Sequence[str]) -> ChatSearch:
    """The search a chat-completion request asks for (``RequestError`` naming the field).

    ``policy_models``: the names the policy answers to, its served name first (then its model
    path); a request may give any of them and the search is named by the first."""
    try:
        chat = ChatRequest.model_validate(body)
    except ValidationError as err:
        raise _request_error(err) from None
    model = chat.model
    if model in policy_models:
        model = policy_models[0]
    elif model not in METHOD_ALIASES:
        raise RequestError("model", f"unknown model {model!r}; expected {[*policy_models[:1], *METHOD_ALIASES]}")
    _refuse_unsupported(chat)
    problem, system = _messages(chat.messages)
    include_usage = chat.stream_options is not None and chat.stream_options.include_usage

    # Lowest precedence first: headers, then the body (top level, then the ets object).
    values: dict[str, Any] = {}
    params: dict[str, str] = {}
    for key, (shown, value) in header_values(headers).items():
        values[key], params[key] = value, shown
    from_body: dict[str, tuple[str, Any]] = {}
    if model in METHOD_ALIASES:
        from_body["method"] = ("model", model)
    for key in _TOP_LEVEL_CONFIG:
        if getattr(chat, key) is not None:
            from_body[key] = (key, getattr(chat, key))
    ets = chat.ets
    for key in ets.model_fields_set if ets is not None else ():
        param, value = f"ets.{key}", getattr(ets, key)
        if key in from_body and from_body[key][1] != value:
            raise RequestError(param, f"conflicts with {from_body[key][0]}={from_body[key][1]!r}")
        from_body[key] = (param, value)
    for key, (param, value) in from_body.items():
        values[key], params[key] = value, param

    budget = _new_tokens(chat)
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
        max_new_tokens=None if budget is None else budget[1], stream=bool(chat.stream), include_usage=include_usage,
        candidates=bool(values.pop("candidates", False)), timeout_s=timeout,
        request_id=str(values.pop("request_id", "") or ""), params=params,
    )
