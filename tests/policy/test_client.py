"""PolicyClient against a real SGLang CPU server (tiny policy model) on loopback, plus the
failure modes against real sockets (nothing listening, a server that never answers)."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest

from ets.engine.process import free_port
from ets.policy.client import (
    PolicyClient,
    PolicyRequestError,
    PolicyUnavailable,
    SamplingParams,
)
from ets.retry import RetryPolicy

TAG = "ки"  # a single added token in the tiny policy tokenizer (math-shepherd step tag)


@pytest.fixture(scope="module")
def vocab(tiny_policy_model: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_policy_model)
    return {"tag": tok.convert_tokens_to_ids(TAG), "eos": tok.eos_token_id, "size": len(tok)}


@pytest.fixture()
async def client(policy_server: str, vocab: dict[str, int]) -> AsyncIterator[PolicyClient]:
    async with PolicyClient(policy_server, timeout_s=120, vocab_size=vocab["size"]) as c:
        yield c


async def _prompt(client: PolicyClient, text: str = "What is 12 plus 30?\n") -> list[int]:
    return await client.tokenize(text)


@pytest.mark.sglang
async def test_n_samples_lengths_and_accounting(client: PolicyClient) -> None:
    ids = await _prompt(client)
    samples = await client.generate_one(ids, SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True), n=3)
    assert len(samples) == 3
    for s in samples:
        assert s.finish == "length" and s.matched is None
        assert len(s.output_ids) == 12 == s.completion_tokens
        assert s.prompt_tokens == len(ids)
        assert 0 <= s.cached_tokens < len(ids)
        assert all(0 <= t for t in s.output_ids)
    # Temperature 1 over a random model: the three samples are not all the same.
    assert len({s.output_ids for s in samples}) > 1


@pytest.mark.sglang
@pytest.mark.parametrize("keep", [True, False])
async def test_stop_string_tag_kept_or_trimmed_ids_always_exact(client: PolicyClient, vocab: dict[str, int],
                                                              keep: bool) -> None:
    ids = await _prompt(client)
    # Bias toward the tag so the step ends on it within a few tokens.
    params = SamplingParams(max_new_tokens=64, temperature=1.0, stop=(TAG,), no_stop_trim=keep,
                            logit_bias={vocab["tag"]: 6.0})
    samples = await client.generate_one(ids, params, n=4)
    stopped = [s for s in samples if s.finish == "stop"]
    assert stopped, [s.finish for s in samples]
    for s in stopped:
        assert s.matched == TAG
        # The ids hold what the engine cached, delimiter included, in both modes.
        assert s.output_ids[-1] == vocab["tag"]
        assert TAG not in s.text[:-len(TAG)]
        assert s.text.endswith(TAG) == keep


@pytest.mark.sglang
async def test_eos_is_distinguished_from_stop(client: PolicyClient, vocab: dict[str, int]) -> None:
    ids = await _prompt(client)
    params = SamplingParams(max_new_tokens=16, stop=(TAG,), logit_bias={vocab["eos"]: 50.0})
    [s] = await client.generate_one(ids, params)
    assert s.finish == "eos" and s.matched == vocab["eos"]
    # A stop *token* we asked for is a stop, not an eos.
    [t] = await client.generate_one(
        ids, SamplingParams(max_new_tokens=16, stop_token_ids=(vocab["tag"],), no_stop_trim=True,
                            logit_bias={vocab["tag"]: 50.0}))
    assert t.finish == "stop" and t.matched == vocab["tag"] and t.output_ids == (vocab["tag"],)


@pytest.mark.sglang
async def test_token_exact_continuation_is_served_from_cache(client: PolicyClient) -> None:
    # A long unique parent so the cache hit cannot come from earlier tests.
    parent = await _prompt(client, "Continuation check " + " ".join(str(i) for i in range(60, 110)) + "\n")
    [first] = await client.generate_one(parent, SamplingParams(max_new_tokens=20, ignore_eos=True))
    child = parent + list(first.output_ids)
    [second] = await client.generate_one(child, SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert second.prompt_tokens == len(child)
    # Everything but the parent's last sampled token (its KV was never computed) is a cache hit.
    assert second.cached_tokens == len(child) - 1, (second.cached_tokens, len(child))


@pytest.mark.sglang
async def test_shared_long_prefix_reports_cached_tokens(client: PolicyClient) -> None:
    prefix = await _prompt(client, "Shared prefix " + " ".join(str(i) for i in range(200, 300)) + "\n")
    [a] = await client.generate_one(prefix + [300, 301], SamplingParams(max_new_tokens=2, ignore_eos=True))
    [b] = await client.generate_one(prefix + [302, 303, 304], SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert a.cached_tokens < len(prefix)
    assert b.cached_tokens >= len(prefix)


@pytest.mark.sglang
async def test_batched_input_ids_with_n_come_back_prompt_major(client: PolicyClient) -> None:
    p1 = await _prompt(client, "First question?\n")
    p2 = await _prompt(client, "A rather longer second question about numbers 1 2 3?\n")
    p3 = p1[:3]
    out = await client.generate([p1, p2, p3], SamplingParams(max_new_tokens=3, ignore_eos=True), n=2)
    assert [len(x) for x in out] == [2, 2, 2]
    assert [s.prompt_tokens for x in out for s in x] == [len(p1)] * 2 + [len(p2)] * 2 + [len(p3)] * 2
    # Different parameters per prompt in the same call.
    out = await client.generate([p1, p2], [SamplingParams(max_new_tokens=2, ignore_eos=True),
                                           SamplingParams(max_new_tokens=5, ignore_eos=True)])
    assert [len(x[0].output_ids) for x in out] == [2, 5]


@pytest.mark.sglang
async def test_regex_constrained_answer(client: PolicyClient) -> None:
    ids = await _prompt(client)
    samples = await client.generate_one(
        ids, SamplingParams(max_new_tokens=24, temperature=1.0, regex=r"The answer is [0-9]+"), n=3)
    for s in samples:
        assert re.fullmatch(r"The answer is [0-9]+", s.text), s.text
        assert s.finish in ("eos", "length")


@pytest.mark.sglang
async def test_bad_requests_raise_request_error_with_server_message(client: PolicyClient) -> None:
    ids = await _prompt(client)
    with pytest.raises(PolicyRequestError) as err:
        await client.generate_one(ids, SamplingParams(max_new_tokens=4, regex="(("))
    assert err.value.status == 400 and "regex" in err.value.message.lower()
    # Client-side checks name the field and never reach (or crash) the server: an out-of-vocabulary
    # id kills SGLang 0.5.23's scheduler.
    with pytest.raises(PolicyRequestError, match=r"input_ids\[0\]\[1\]: token id 99999 outside"):
        await client.generate([[1, 99999]], SamplingParams(max_new_tokens=1))
    with pytest.raises(PolicyRequestError, match="max_new_tokens"):
        await client.generate([ids], SamplingParams(max_new_tokens=-1))
    with pytest.raises(PolicyRequestError, match=r"input_ids\[0\]"):
        await client.generate([[]], SamplingParams(max_new_tokens=1))
    assert await client.health()


@pytest.mark.sglang
async def test_too_long_prompt_is_a_request_error(client: PolicyClient, tiny_policy_model: Path) -> None:
    # The engine's context length is the model's (the fixture's engine sets no --context-length).
    max_len = json.loads((tiny_policy_model / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(PolicyRequestError) as err:
        await client.generate([[5] * (max_len + 10)], SamplingParams(max_new_tokens=1))
    assert err.value.message
    assert await client.health()


@pytest.mark.sglang
async def test_tokenize_and_info(client: PolicyClient, tiny_policy_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_policy_model)
    text = "Janet has 3 apples. ки"
    assert await client.tokenize(text) == tok(text)["input_ids"]
    chat = await client.tokenize_chat([{"role": "user", "content": "hi"}])
    rendered: Any = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True,
                                            add_generation_prompt=True, return_dict=True)
    assert chat == rendered["input_ids"]
    info = await client.model_info()
    assert info["is_generation"] and Path(info["model_path"]) == tiny_policy_model
    assert "sglang:prompt_tokens_total" in await client.metrics_text()


async def test_nothing_listening_raises_unavailable_after_bounded_retries() -> None:
    port = free_port()
    retry = RetryPolicy(max_retries=2, initial_backoff_s=0.05, max_backoff_s=0.1)
    async with PolicyClient(f"http://127.0.0.1:{port}", retry=retry, timeout_s=5) as client:
        start = time.monotonic()
        with pytest.raises(PolicyUnavailable, match="after 3 attempts"):
            await client.generate([[1, 2, 3]], SamplingParams(max_new_tokens=1))
        assert time.monotonic() - start < 5
        assert not await client.health()


async def test_server_that_never_answers_times_out() -> None:
    # A real listening socket that accepts and then says nothing.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    try:
        async with PolicyClient(f"http://127.0.0.1:{port}", timeout_s=1.0) as client:
            start = time.monotonic()
            with pytest.raises(PolicyUnavailable, match="timed out"):
                await client.generate([[1, 2, 3]], SamplingParams(max_new_tokens=1))
            assert time.monotonic() - start < 5
    finally:
        srv.close()


@pytest.mark.sglang
async def test_server_killed_mid_session_becomes_unavailable(sglang_servers: Any,
                                                             tiny_model_factory: Callable[[str], Path]) -> None:
    """A dedicated server (not the shared one) is stopped; the next call fails over retries."""
    model = tiny_model_factory("policy-qwen2")
    proc = sglang_servers.get(model)
    retry = RetryPolicy(max_retries=2, initial_backoff_s=0.05, max_backoff_s=0.1)
    async with PolicyClient(proc.url, retry=retry, timeout_s=60) as client:
        ids = await client.tokenize("hello\n")
        [s] = await client.generate_one(ids, SamplingParams(max_new_tokens=2, ignore_eos=True))
        assert s.finish == "length"
        await asyncio.to_thread(sglang_servers.stop, proc)
        with pytest.raises(PolicyUnavailable):
            await client.generate_one(ids, SamplingParams(max_new_tokens=2))



_ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
                  "additionalProperties": False}


@pytest.mark.sglang
async def test_json_schema_constrained_answer_xgrammar(client: PolicyClient) -> None:
    import json

    ids = await _prompt(client)
    [s] = await client.generate_one(ids, SamplingParams(max_new_tokens=48, json_schema=json.dumps(_ANSWER_SCHEMA)))
    assert s.finish == "eos", s
    assert isinstance(json.loads(s.text)["answer"], int)


@pytest.mark.sglang
async def test_outlines_grammar_backend(sglang_servers: Any, tiny_policy_model: Path, vocab: dict[str, int]) -> None:
    """The launcher's grammar-backend choice reaches SGLang; outlines needs `datasets` (pinned in
    requirements/sglang-cpu.txt) or every constrained request fails to compile."""
    import json

    proc = sglang_servers.get(tiny_policy_model, grammar_backend="outlines")
    assert "--grammar-backend outlines" in proc.log_tail(10_000)
    async with PolicyClient(proc.url, timeout_s=120, vocab_size=vocab["size"]) as c:
        ids = await c.tokenize("What is 12 plus 30?\n")
        for s in await c.generate_one(ids, SamplingParams(max_new_tokens=24, regex=r"The answer is [0-9]+"), n=2):
            assert re.fullmatch(r"The answer is [0-9]+", s.text), s.text
        [s] = await c.generate_one(ids, SamplingParams(max_new_tokens=48, json_schema=json.dumps(_ANSWER_SCHEMA)))
        assert isinstance(json.loads(s.text)["answer"], int), s.text
