"""PRM adapters and the transformers backend, checked against computations written here.

No SGLang: the tiny models' tokenizers must hold each adapter's tokens as single ids, the
adapters must put score positions where the model types read them, and the transformers backend
(batched, padded, head applied only at score positions) must equal a direct full forward pass
of the model, formatted independently in this file. For llemma and qwen-prm this independent
computation is the reference; SGLang-vs-transformers agreement is in test_reward_server.py.
"""
from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from ets.reward.adapters import AdapterError, PrmOptions, make_adapter, single_token_id
from ets.reward.backends.transformers_backend import TransformersBackend
from ets.reward.batching import MicroBatcher
from ets.testing.tiny_models import KINDS

PRM_KINDS = ("math-shepherd", "rlhflow", "llemma", "qwen-prm")

CASES: list[tuple[str, list[str]]] = [
    ("What is 3 + 5?", ["Step 1: we add the numbers", "Step 2: so 3 + 5 = 8", "Step 3: The answer is 8"]),
    ("Compute the sum of 17 and 25.", ["17 + 25 = 42", "The answer is 42"]),
    ("Let x = 4. What is 2x?", ["2x = 8"]),
    ("A long question about the total of each value we get when we check the numbers twice?",
     ["first we verify each value", "then the sum of numbers plus the total", "so the final result is 12",
      "check because the answer is 12"]),
]


@pytest.fixture(scope="module")
def tokenizers(tiny_model_factory: Callable[[str], Path]) -> dict[str, object]:
    from transformers import AutoTokenizer

    return {k: AutoTokenizer.from_pretrained(tiny_model_factory(k)) for k in PRM_KINDS}


@pytest.mark.parametrize("kind", PRM_KINDS + ("policy", "policy-qwen2"))
def test_tiny_tokenizer_vocab_matches_model(kind: str, tiny_model_factory: Callable[[str], Path]) -> None:
    """Every id the tokenizer can produce exists in the model's embedding (the Qwen2Tokenizer
    class transformers picks for qwen2 must not append an out-of-range unk token)."""
    from transformers import AutoTokenizer

    path = tiny_model_factory(kind)
    tok = AutoTokenizer.from_pretrained(path)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    assert len(tok) == vocab
    ids = tok.encode("What is 1+1? ки <extra_0> ☃ unknown bytes \x07")
    assert max(ids) < vocab


@pytest.mark.parametrize("kind", PRM_KINDS)
def test_adapter_tokens_are_single_ids(kind: str, tokenizers: dict[str, object]) -> None:
    tok: Any = tokenizers[kind]
    adapter: Any = make_adapter(kind, tok)  # kind-specific token ids (tag_id, separator_id, ...)
    opts = PrmOptions()
    if kind in ("math-shepherd", "llemma"):
        assert tok.convert_ids_to_tokens([adapter.tag_id]) == [opts.step_tag]
    if kind in ("math-shepherd", "rlhflow"):
        assert tok.decode([adapter.plus_id]) == "+" and tok.decode([adapter.minus_id]) == "-"
    if kind == "qwen-prm":
        assert tok.convert_ids_to_tokens([adapter.separator_id]) == ["<extra_0>"]
    for token in KINDS[kind].added_tokens + KINDS[kind].special_tokens:
        single_token_id(tok, token, "token")


def test_adapter_errors_name_the_setting(tokenizers: dict[str, object]) -> None:
    with pytest.raises(AdapterError) as err:
        make_adapter("orm", tokenizers["math-shepherd"])
    assert err.value.field == "ETS_PRM_TYPE"
    # rlhflow's tokenizer has no single-token "ки": a math-shepherd adapter over it is refused.
    with pytest.raises(AdapterError) as err:
        make_adapter("math-shepherd", tokenizers["rlhflow"])
    assert err.value.field == "ETS_PRM_STEP_TAG"
    with pytest.raises(AdapterError) as err:
        make_adapter("qwen-prm", tokenizers["math-shepherd"])
    assert err.value.field == "ETS_PRM_SEPARATOR"


@pytest.mark.parametrize("kind", PRM_KINDS)
def test_score_positions(kind: str, tokenizers: dict[str, object]) -> None:
    tok = tokenizers[kind]
    adapter = make_adapter(kind, tok)
    q, steps = CASES[0]
    enc = adapter.encode(q, steps)
    assert len(enc.score_positions) == len(steps)
    assert list(enc.score_positions) == sorted(enc.score_positions)
    ids = enc.input_ids
    for p in enc.score_positions:
        if kind in ("math-shepherd", "llemma"):
            assert ids[p] == adapter.tag_id  # type: ignore[attr-defined]
        elif kind == "rlhflow":
            assert ids[p + 1] == adapter.plus_id  # the assistant's answer token follows
        else:
            assert ids[p] == adapter.separator_id  # type: ignore[attr-defined]
    # A tag the policy left on a step does not add a score position.
    if kind in ("math-shepherd", "llemma"):
        assert adapter.encode(q, [s + " ки" for s in steps]) == enc
    # Prefix stability: a trajectory's encoding starts with its parent's (up to the last position).
    parent = adapter.encode(q, steps[:-1])
    assert ids[: len(parent.last_step_prompt())] == parent.last_step_prompt()


@pytest.mark.parametrize("kind", PRM_KINDS)
def test_empty_steps_keep_their_score_position(kind: str, tokenizers: dict[str, object]) -> None:
    adapter = make_adapter(kind, tokenizers[kind])
    q, steps = CASES[0]
    with_empty = [steps[0], "", " ", *steps[1:]]
    enc = adapter.encode(q, with_empty)
    assert len(enc.score_positions) == len(with_empty)
    assert len(set(enc.score_positions)) == len(with_empty)
    # The first step's prompt is unchanged by what follows it.
    first = adapter.encode(q, steps[:1])
    assert enc.input_ids[: len(first.last_step_prompt())] == first.last_step_prompt()


def _reference_scores(kind: str, model_dir: Path, question: str, steps: list[str]) -> list[float]:
    """The readout computed the plain way: format by hand, one full forward, full logits."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if kind == "qwen-prm":
        model = AutoModelForTokenClassification.from_pretrained(model_dir)
        text = tok.apply_chat_template(
            [{"role": "system", "content": PrmOptions().system_prompt}, {"role": "user", "content": question},
             {"role": "assistant", "content": "".join(s + "<extra_0>" for s in steps)}], tokenize=False)
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        sep = tok.convert_tokens_to_ids("<extra_0>")
        with torch.no_grad():
            probs = model(ids).logits[0].float().softmax(-1)
        return probs[ids[0] == sep, 1].tolist()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    plus, minus = tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-")
    if kind == "rlhflow":
        conv = []
        for k, s in enumerate(steps):
            conv += [{"role": "user", "content": f"{question} {s}" if k == 0 else s},
                     {"role": "assistant", "content": "+"}]
        ids = torch.tensor([tok.encode(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)])
        eot = tok.convert_tokens_to_ids("<|eot_id|>")
        # The assistant "+" tokens are the ones right before an end-of-turn after an assistant header.
        answer_at = [i for i in range(1, ids.shape[1] - 1) if ids[0, i] == plus and ids[0, i + 1] == eot]
        with torch.no_grad():
            logits = model(ids).logits[0].float()
        return [1 / (1 + math.exp(-(logits[i - 1, plus] - logits[i - 1, minus]).item())) for i in answer_at]
    text = question + "\n" + "\n".join(f"{s} ки" for s in steps)
    ids = torch.tensor([tok.encode(text)])
    tag = tok.convert_tokens_to_ids("ки")
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    at = logits[ids[0] == tag]
    if kind == "llemma":
        return torch.sigmoid(at.mean(-1)).tolist()
    return torch.sigmoid(at[:, plus] - at[:, minus]).tolist()


@pytest.mark.parametrize("kind", PRM_KINDS)
async def test_transformers_backend_matches_direct_forward(kind: str,
                                                           tiny_model_factory: Callable[[str], Path]) -> None:
    model_dir = tiny_model_factory(kind)
    backend = TransformersBackend(str(model_dir), kind, max_batch_tokens=256)  # small: forces several chunks
    await backend.start()
    try:
        encoded = [backend.adapter.encode(q, s) for q, s in CASES]
        full = (await backend.score(encoded, last_step_only=False)).scores
        last = (await backend.score(encoded, last_step_only=True)).scores
        # Concurrent callers are merged into shared forward passes and still get their own rows.
        singles = await asyncio.gather(*(backend.score([e], False) for e in encoded))
    finally:
        await backend.close()
    flat: list[float] = []
    for (q, steps), got, got_last, single in zip(CASES, full, last, singles, strict=True):
        want = _reference_scores(kind, model_dir, q, steps)
        assert len(got) == len(steps)
        assert got == pytest.approx(want, abs=1e-2)
        assert got_last == pytest.approx([got[-1]], abs=1e-2)
        assert single.scores[0] == pytest.approx(got, abs=1e-2)
        assert all(0.0 <= s <= 1.0 for s in got)
        flat += got
    # The tiny PRMs are shaped so that scores depend on context: agreement above is not 0.5 == 0.5.
    assert max(flat) - min(flat) > 0.2, flat


async def test_micro_batcher_merges_concurrent_requests() -> None:
    calls: list[list[int]] = []

    def square(items: list[int]) -> list[int]:
        calls.append(list(items))
        import time

        time.sleep(0.05)
        return [x * x for x in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(square, max_items=8, name="test")
    try:
        results = await asyncio.gather(*(batcher.submit([i, i + 100]) for i in range(6)))
    finally:
        await batcher.aclose()
    assert results == [[i * i, (i + 100) ** 2] for i in range(6)]
    # The first call runs alone; what queued meanwhile shares calls of at most 8 items.
    assert len(calls) < 6 and all(len(c) <= 8 for c in calls)
    assert sorted(x for c in calls for x in c) == sorted(x for i in range(6) for x in (i, i + 100))
