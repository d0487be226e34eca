"""The ``judge`` PRM type on the real SmolLM2-135M-Instruct (conftest's ``smollm2``, prepared by
``ets models prepare``): its conversation over the model's own tokenizer and chat template, its
options, the transformers backend against a direct forward pass formatted by hand here, and the
SGLang backend against the transformers backend through two real reward servers (per step within
1e-2), with SGLang's prefix cache serving the parent's turns.

Both backends run the model in float32 here: in bfloat16 the two paths round the "Yes"/"No"
logits differently (measured up to 0.057 apart in P(Yes) on these cases), in float32 they agree
to about 1e-5.
"""
from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any, Callable

import grpc
import pytest

from ets.api.v1 import reward_pb2, reward_pb2_grpc
from ets.reward.adapters import AdapterError, PrmOptions, make_adapter
from ets.reward.backends.transformers_backend import TransformersBackend
from ets.reward.client import RewardClient
from ets.search.interfaces import ScoredTrajectory
from reward_fixtures import ThreadedRewardServer, reward_config

QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have now?"
CASES = [
    ScoredTrajectory(QUESTION, ["Tom starts with 3 apples and buys 5 more, so 3 + 5 = 8.", "The answer is 8."]),
    ScoredTrajectory(QUESTION, ["Tom starts with 3 apples and buys 5 more, so 3 + 5 = 9.", "The answer is 9."]),
    ScoredTrajectory("A box holds 12 pencils. How many pencils are in 4 boxes?",
                     ["Each box holds 12 pencils.", "So 4 boxes hold 12 * 4 = 48 pencils.", "The answer is 48."]),
    ScoredTrajectory("There are 30 students and each group has 6 students. How many groups are there?",
                     ["30 * 6 = 180", ""]),
]


@pytest.fixture(scope="module")
def tokenizer(smollm2: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


def test_conversation_holds_question_steps_and_verification(tokenizer: Any) -> None:
    adapter = make_adapter("judge", tokenizer)
    steps = CASES[2].steps
    enc = adapter.encode(CASES[2].question, steps)
    text = tokenizer.decode(enc.input_ids)
    assert text.count(CASES[2].question) == 1 and all(s in text for s in steps)
    assert text.count("Is the newest step correct? Answer Yes or No.") == len(steps)
    yes, no = tokenizer.encode("Yes", add_special_tokens=False), tokenizer.encode("No", add_special_tokens=False)
    assert [adapter.plus_id] == yes and [adapter.minus_id] == no
    assert len(enc.score_positions) == len(steps)
    for p in enc.score_positions:
        # The position before the assistant's answer: "<|im_start|>assistant\n" then "Yes".
        assert tokenizer.decode(enc.input_ids[: p + 1]).endswith("<|im_start|>assistant\n")
        assert enc.input_ids[p + 1] == adapter.plus_id
    # A child's conversation extends its parent's (one forward pass scores every step; an engine's
    # prefix cache holds the parent's turns).
    parent = adapter.encode(CASES[2].question, steps[:-1])
    assert enc.input_ids[: len(parent.input_ids)] == parent.input_ids
    # An empty step (a policy stopping at its delimiter) still gets its own turn.
    assert len(adapter.encode(CASES[3].question, CASES[3].steps).score_positions) == 2


def test_options_override_and_errors_name_the_setting(tokenizer: Any) -> None:
    options = PrmOptions(yes="Correct", no="Wrong", judge_first_turn="Problem: {question}\nStep: {step}\nCorrect?",
                         judge_next_turn="Step: {step}\nCorrect?")
    adapter = make_adapter("judge", tokenizer, options)
    enc = adapter.encode(QUESTION, ["3 + 5 = 8", "The answer is 8."])
    text = tokenizer.decode(enc.input_ids)
    assert f"Problem: {QUESTION}\nStep: 3 + 5 = 8\nCorrect?" in text and "Step: The answer is 8.\nCorrect?" in text
    assert [adapter.plus_id] == tokenizer.encode("Correct", add_special_tokens=False)
    assert all(enc.input_ids[p + 1] == adapter.plus_id for p in enc.score_positions)
    bad = [
        (PrmOptions(yes="Yes indeed"), "ETS_PRM_YES"),
        (PrmOptions(no="No way at all"), "ETS_PRM_NO"),
        (PrmOptions(yes="No"), "ETS_PRM_YES"),
        (PrmOptions(judge_first_turn="Is it correct? {step}"), "ETS_PRM_JUDGE_FIRST_TURN"),
        (PrmOptions(judge_next_turn="Correct?"), "ETS_PRM_JUDGE_NEXT_TURN"),
        (PrmOptions(judge_next_turn="{step} {answer}"), "ETS_PRM_JUDGE_NEXT_TURN"),
    ]
    for opts, field in bad:
        with pytest.raises(AdapterError) as err:
            make_adapter("judge", tokenizer, opts)
        assert err.value.field == field, opts
    env = PrmOptions.from_env({"ETS_PRM_YES": "Correct", "ETS_PRM_NO": "Wrong", "ETS_PRM_JUDGE_NEXT_TURN": "{step}?"})
    assert (env.yes, env.no, env.judge_next_turn) == ("Correct", "Wrong", "{step}?")


@pytest.fixture(scope="module")
def direct_model(smollm2: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


def _direct_scores(tok: Any, model: Any, case: ScoredTrajectory) -> list[float]:
    """P(Yes) vs No computed the plain way: the ChatML conversation written out by hand, one full
    float32 forward pass, full logits read before each assistant "Yes"."""
    import torch

    text = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    for k, step in enumerate(case.steps):
        head = f"Question: {case.question}\n\n" if k == 0 else ""
        text += (f"<|im_start|>user\n{head}Newest step of the solution:\n{step.strip()}\n\n"
                 "Is the newest step correct? Answer Yes or No.<|im_end|>\n<|im_start|>assistant\nYes<|im_end|>\n")
    ids = tok.encode(text, add_special_tokens=False)
    yes, no = tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    answers = [i for i in range(1, len(ids) - 1) if ids[i] == yes and ids[i + 1] == end]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return [1 / (1 + math.exp(-(logits[i - 1, yes] - logits[i - 1, no]).item())) for i in answers]


async def test_transformers_backend_matches_direct_forward(smollm2: Path, tokenizer: Any, direct_model: Any) -> None:
    backend = TransformersBackend(str(smollm2), "judge", dtype="float32", max_batch_tokens=256)  # several chunks
    await backend.start()
    try:
        encoded = [backend.adapter.encode(c.question, c.steps) for c in CASES]
        full = (await backend.score(encoded, last_step_only=False)).scores
        last = (await backend.score(encoded, last_step_only=True)).scores
    finally:
        await backend.close()
    flat: list[float] = []
    for case, got, got_last in zip(CASES, full, last, strict=True):
        assert got == pytest.approx(_direct_scores(tokenizer, direct_model, case), abs=1e-3)
        assert got_last == pytest.approx(got[-1:], abs=1e-4)
        flat += got
    assert all(0.0 < s < 1.0 for s in flat)
    # Real text: the scores differ from step to step (not one constant).
    assert max(flat) - min(flat) > 0.05, flat


@pytest.mark.sglang
async def test_sglang_and_transformers_backends_agree(
    smollm2: Path, sglang_servers: Any, reward_servers: Callable[..., ThreadedRewardServer],
) -> None:
    prm = sglang_servers.get(smollm2, extra_args=("--dtype", "float32", "--mem-fraction-static", "0.15"))
    try:
        via_sglang = reward_servers(reward_config(smollm2, "judge", "sglang", prm_url=prm.url))
        via_transformers = reward_servers(reward_config(smollm2, "judge", "transformers", prm_dtype="float32"))
        async with RewardClient(via_sglang.address) as a, RewardClient(via_transformers.address) as b:
            assert (await a.info()).prm_type == (await b.info()).prm_type == "judge"
            full_a, full_b = await a.score(CASES, prm_type="judge"), await b.score(CASES, prm_type="judge")
            last_a, last_b = await a.score_last_steps(CASES), await b.score_last_steps(CASES)
        for case, sa, sb, la, lb in zip(CASES, full_a, full_b, last_a, last_b, strict=True):
            assert len(sa) == len(sb) == len(case.steps)
            assert sa == pytest.approx(sb, abs=1e-2), case
            assert la == pytest.approx(lb, abs=1e-2) and la == pytest.approx(sa[-1], abs=1e-3)
        # Scoring a child after its parent: SGLang serves the parent's conversation from its cache.
        parent = ScoredTrajectory("What is 12 + 30? Think about the numbers.", ["12 + 30 = 42"])
        child = ScoredTrajectory(parent.question, [*parent.steps, "The answer is 42."])
        async with grpc.aio.insecure_channel(via_sglang.address) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            first = await stub.Score(reward_pb2.ScoreRequest(
                trajectories=[reward_pb2.Trajectory(question=parent.question, steps=parent.steps)],
                last_step_only=True), timeout=120)
            second = await stub.Score(reward_pb2.ScoreRequest(
                trajectories=[reward_pb2.Trajectory(question=child.question, steps=child.steps)],
                last_step_only=True), timeout=120)
        assert second.cached_tokens >= first.prompt_tokens - 1 > 0
    finally:
        # A float32 SmolLM2 engine holds ~1.5 GB: free it for the modules that follow.
        await asyncio.to_thread(sglang_servers.stop, prm)
