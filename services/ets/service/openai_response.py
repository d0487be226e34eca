"""OpenAI chat-completion responses as typed models (pure: no I/O, no HTTP library).

Owns the shapes ``ets.service.openai_http`` renders, as its requests have theirs
(``ets.service.openai_request``): ``ChatCompletion`` and ``ChatCompletionChunk`` in OpenAI's
format, ``Usage`` (the whole search's tokens), and the ``ets`` object (``EtsResult``: answer,
resolved config, statistics, votes and, on request, every candidate; ``EtsProgress``: one depth of
a stream). The search's own records are typed by the core's dataclasses themselves
(``SearchConfig``, ``SearchStats``, ``DepthReport``, ``AnswerVote``, ``ServedCandidate``), so a
field added there reaches HTTP clients without a copy to keep in step.
Models are dumped with ``exclude_unset``: a field given (even as null) is sent, one left out is not
(a chunk's delta carries only what changed; ``candidates`` only when asked for).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ets.search.answers import AnswerVote
from ets.search.config import SearchConfig
from ets.search.loop import DepthReport, SearchStats
from ets.search.pipeline import ServedCandidate


class _Response(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=False)

    def model_post_init(self, context: Any, /) -> None:
        # A field with a constant default (``object``, ``role``) is part of the shape: always sent.
        self.model_fields_set.update(
            name for name, f in type(self).model_fields.items() if not f.is_required() and f.default is not None)

    def render(self) -> dict[str, Any]:
        """The JSON body: every field that was given (null included), none that was left out."""
        return self.model_dump(mode="json", exclude_unset=True)


class PromptTokensDetails(_Response):
    cached_tokens: int


class Usage(_Response):
    """The whole search's tokens: every prompt sent to the policy and every token generated."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class EtsResult(_Response):
    """What a chat completion cannot say: the search's answer, config, statistics and votes."""

    request_id: str
    answer: str
    best_index: int | None
    config: SearchConfig
    stats: SearchStats
    system_prompt: str
    votes: list[AnswerVote]  # every answer group, the chosen first
    candidates: list[ServedCandidate] | None = None  # only when the request asked for them


class EtsProgress(_Response):
    progress: DepthReport


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(_Response):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop"]
    logprobs: None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    ets: EtsResult


class Delta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Response):
    index: int
    delta: Delta
    finish_reason: Literal["stop"] | None
    logprobs: None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None  # only the last chunk, with stream_options.include_usage
    ets: EtsResult | EtsProgress | None = None
