"""SGLangStepGenerator against a real SGLang CPU server: one batched call per depth with a
different n per node (after one prefill-only call for unseen shared prefixes), finish mapping,
token-exact children, the root fan-out cached by its prefill, accounting equal to the engine's
own counters (prefill included), and root tokenization per policy model type."""
from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from ets.policy.model_types import policy_model_type
from ets.policy.client import PolicyClient
from ets.policy.generator import SGLangStepGenerator, tokenize_root
from ets.search.interfaces import ExpandRequest, StepParams

pytestmark = pytest.mark.sglang
TAG = "ки"


class CountingClient(PolicyClient):
    """The real client, counting its /generate calls."""

    calls = 0

    async def generate(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return await super().generate(*args, **kwargs)


@pytest.fixture()
async def client(policy_server: str) -> AsyncIterator[CountingClient]:
    async with CountingClient(policy_server, timeout_s=120) as c:
        yield c


@pytest.fixture(scope="module")
def tag_id(tiny_policy_model: Path) -> int:
    from transformers import AutoTokenizer

    tag = AutoTokenizer.from_pretrained(tiny_policy_model).convert_tokens_to_ids(TAG)
    assert isinstance(tag, int)
    return tag


_METRIC = re.compile(r"^(sglang:(?:prompt_tokens_total|cached_tokens_total))\{[^}]*\}\s+([0-9.e+]+)$", re.M)


async def _counters(client: PolicyClient) -> dict[str, float]:
    totals: dict[str, float] = {}
    for name, value in _METRIC.findall(await client.metrics_text()):
        totals[name] = totals.get(name, 0.0) + float(value)
    return totals


async def test_one_call_per_depth_with_per_node_n_and_step_finish(client: CountingClient, tag_id: int) -> None:
    gen = SGLangStepGenerator(client, "math-shepherd", logit_bias={tag_id: 6.0})
    assert gen.stop == ("ки",) and gen.no_stop_trim
    root = await tokenize_root(client, "What is 7 times 6?", "math-shepherd")
    a = list(root.prompt_ids) + [300, 301]
    b = list(root.prompt_ids) + [302]
    requests = [ExpandRequest(a, 3), ExpandRequest(b, 0), ExpandRequest(root.prompt_ids, 1),
                ExpandRequest(b, 2, max_new_tokens=64)]
    out = await gen.expand(requests, StepParams(max_new_tokens=64, temperature=1.0))
    # One prefill-only call for the two unseen prefixes several samples share (a: 3, b: 2), then
    # one batched call for all samples.
    assert client.calls == 2
    assert [len(x) for x in out] == [3, 0, 1, 2]
    steps = [s for x in out for s in x]
    assert any(s.finish == "step" for s in steps)
    for s in steps:
        if s.finish == "step":
            assert s.token_ids[-1] == tag_id and s.text.endswith(TAG)
        assert s.finish in ("step", "eos", "length")
    # The prefill's prompt tokens are counted on the first sample of its prefix.
    assert [s.prompt_tokens for s in out[0]] == [2 * len(a)] + [len(a)] * 2
    assert [s.prompt_tokens for s in out[3]] == [2 * len(b), len(b)]
    assert [s.prompt_tokens for s in out[2]] == [len(root.prompt_ids)]
    assert await gen.expand([], StepParams(8, 1.0)) == []


async def test_length_finish_and_per_node_token_cap(client: CountingClient) -> None:
    gen = SGLangStepGenerator(client, stop=("@@never@@",), no_stop_trim=True)
    root = await tokenize_root(client, "Count to ten.", "math-shepherd")
    [[s]] = await gen.expand([ExpandRequest(root.prompt_ids, 1, max_new_tokens=3)], StepParams(50, 1.0))
    assert s.finish in ("length", "eos")
    assert len(s.token_ids) <= 3
    if s.finish == "length":
        assert len(s.token_ids) == 3


async def test_children_continue_token_exact_from_cache(client: CountingClient) -> None:
    gen = SGLangStepGenerator(client, "math-shepherd")
    root = await tokenize_root(client, "Child cache check " + " ".join(map(str, range(400, 440))), "math-shepherd")
    [[parent]] = await gen.expand([ExpandRequest(root.prompt_ids, 1)], StepParams(16, 1.0))
    child_prefix = list(root.prompt_ids) + list(parent.token_ids)
    [children] = await gen.expand([ExpandRequest(child_prefix, 3)], StepParams(4, 1.0))
    assert len(children) == 3
    for c in children:
        assert c.prompt_tokens == len(child_prefix)
        assert c.cached_tokens >= len(child_prefix) - 1


async def test_root_fan_out_finds_the_prefilled_root_cached(client: CountingClient) -> None:
    # Without the prefill the engine prefills identical uncached prompts of one batch together:
    # the control shows at least one sample of the fan-out missing the shared root.
    params = StepParams(4, 1.0)
    for prefill, question in ((0, "Fan-out control"), (2, "Fan-out prefilled")):
        gen = SGLangStepGenerator(client, "math-shepherd", prefill_min_shared=prefill)
        root = await tokenize_root(client, question + " " + " ".join(map(str, range(600, 660))), "math-shepherd")
        calls = client.calls
        [fan] = await gen.expand([ExpandRequest(root.prompt_ids, 4)], params)
        n = len(root.prompt_ids)
        if prefill:
            assert client.calls == calls + 2
            # Every sample found the root cached but the last token; the first also carries the
            # prefill request's own n prompt tokens (and whatever of them the engine already had).
            assert [(s.prompt_tokens, s.cached_tokens) for s in fan[1:]] == [(n, n - 1)] * 3
            assert fan[0].prompt_tokens == 2 * n and n - 1 <= fan[0].cached_tokens < 2 * n - 1
        else:
            assert client.calls == calls + 1
            assert min(s.cached_tokens for s in fan) < n - 1
        # The next depth's children are the generator's own: no prefill call before them.
        calls = client.calls
        await gen.expand([ExpandRequest(list(root.prompt_ids) + list(s.token_ids), 2) for s in fan], params)
        assert client.calls == calls + 1


async def test_accounting_sums_equal_the_engine_counters(client: CountingClient) -> None:
    gen = SGLangStepGenerator(client, "math-shepherd")
    root = await tokenize_root(client, "Accounting " + " ".join(map(str, range(500, 530))), "math-shepherd")
    before = await _counters(client)
    out = await gen.expand([ExpandRequest(root.prompt_ids, 2), ExpandRequest(list(root.prompt_ids)[:-3], 3)],
                           StepParams(6, 1.0))
    steps = [s for x in out for s in x]
    want = {"sglang:prompt_tokens_total": sum(s.prompt_tokens for s in steps),
            "sglang:cached_tokens_total": sum(s.cached_tokens for s in steps)}
    got: dict[str, float] = {}
    for _ in range(40):  # counters are exported by the scheduler a moment after the response
        after = await _counters(client)
        got = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in want}
        if got == want:
            break
        await asyncio.sleep(0.1)
    assert got == want
    assert want["sglang:cached_tokens_total"] > 0


async def test_tokenize_root_per_model_type(client: CountingClient, tiny_policy_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_policy_model)
    q = "Janet has 3 apples and buys 4 more. How many?"
    root = await tokenize_root(client, q, "math-shepherd")
    assert root.question == q and list(root.prompt_ids) == tok(q + "\n")["input_ids"]
    mt = policy_model_type("llama-instruct")
    chat_root = await tokenize_root(client, q, mt)
    rendered: Any = tok.apply_chat_template(mt.root_messages(q), tokenize=True, add_generation_prompt=True,
                                            return_dict=True)
    expected = rendered["input_ids"]
    assert list(chat_root.prompt_ids) == list(expected)
