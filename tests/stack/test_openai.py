"""The OpenAI-compatible front door of a real ``ets serve`` on the CPU stack (SGLang policy, reward
server with its SGLang PRM): the official ``openai`` client (sync and async, streaming and not)
gets the same search as gRPC ``Search``, through ``extra_body``, headers and a method alias as
``model``; ``/v1/models`` names the policy SGLang serves. The service's own behaviour (every
status, disconnects) is tested in-process: tests/service/test_openai.py.

The searches compared are greedy (temperature 0): seeded sampling at temperature 1 is not
reproducible run to run on the CPU engine (batch composition and cache state move the logits a
little; four runs of one seeded width-4 REBASE search on the tiny models gave three different
trees, even with the policy's cache flushed before each), while greedy beam search gave the same
tree in four runs out of four."""
from __future__ import annotations

from typing import Any

import grpc
import openai
import pytest

from ets.api.v1 import search_pb2, search_pb2_grpc
from ets.testing.stack import Stack
from tools import small

pytestmark = [pytest.mark.sglang, pytest.mark.stack, pytest.mark.timeout(1200)]

PROBLEM = "Tom has 3 apples and buys 5 more. How many apples does he have now?"
MESSAGES: list[Any] = [{"role": "user", "content": PROBLEM}]


def grpc_search(stack: Stack, config: search_pb2.SearchConfig) -> search_pb2.SearchResponse:
    with grpc.insecure_channel(stack.search_addr) as channel:
        return search_pb2_grpc.SearchServiceStub(channel).Search(
            search_pb2.SearchRequest(problem=PROBLEM, config=config), timeout=300)


def test_openai_client_gets_the_grpc_search(search_stack: Stack) -> None:
    client = openai.OpenAI(base_url=search_stack.search_openai_url, api_key="unused", timeout=300, max_retries=0)
    models = [m.id for m in client.models.list()]
    policy = models[0]
    assert models[1:] == ["ets", "rebase", "beam", "dvts", "best_of_n"] and policy not in models[1:]
    expected = grpc_search(search_stack, small("beam", 4, seed=5, temperature=0.0, beam_keep=2))
    reply = client.chat.completions.create(
        model=policy, messages=MESSAGES, seed=5, temperature=0.0,
        extra_body={"ets": {"method": "beam", "width": 4, "beam_keep": 2, "max_step_tokens": 12, "max_tokens": 96,
                            "max_depth": 4}})
    ets = (reply.model_extra or {})["ets"]
    assert ets["answer"] == expected.answer
    assert reply.choices[0].message.content == expected.best.text and expected.best.text
    assert ets["stats"]["model_calls"] == expected.stats.model_calls
    assert ets["stats"]["total_kv_tokens"] == expected.stats.total_kv_tokens
    assert reply.usage is not None and reply.usage.completion_tokens == expected.stats.generated_tokens > 0
    # The same search through headers (X-ETS-*): the same result.
    by_headers = client.chat.completions.create(
        model=policy, messages=MESSAGES,
        extra_headers={"X-ETS-Method": "beam", "X-ETS-Width": "4", "X-ETS-Beam-Keep": "2", "X-ETS-Seed": "5",
                       "X-ETS-Temperature": "0", "X-ETS-Max-Step-Tokens": "12", "X-ETS-Max-Tokens": "96",
                       "X-ETS-Max-Depth": "4"})
    assert by_headers.choices[0].message.content == expected.best.text


async def test_async_stream_with_a_method_alias_as_model(search_stack: Stack) -> None:
    expected = grpc_search(search_stack, small("beam", 4, seed=2, temperature=0.0))
    async with openai.AsyncOpenAI(base_url=search_stack.search_openai_url, api_key="unused", timeout=300,
                                  max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="beam", messages=MESSAGES, seed=2, temperature=0.0, stream=True,
            stream_options={"include_usage": True},
            extra_body={"ets": {"width": 4, "max_step_tokens": 12, "max_tokens": 96, "max_depth": 4}})
        chunks = [c async for c in stream]
    progress = [c.model_extra["ets"]["progress"] for c in chunks
                if c.model_extra and "progress" in c.model_extra.get("ets", {})]
    assert [p["depth"] for p in progress] == list(range(len(progress))) and progress
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.best.text
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason == "stop")
    assert (final.model_extra or {})["ets"]["answer"] == expected.answer
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == expected.stats.generated_tokens
