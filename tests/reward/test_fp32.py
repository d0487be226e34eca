"""PRM scores computed in fp32 whatever the model's dtype (issue 24, finding 4).

A 7B PRM's "+"/"-" logits sit around 16-32, where bf16 steps are 0.125: rounding each logit
before the difference moves a step score near 0.5 by up to ~0.03. The tiny PRMs here get heads
reshaped to that scale (a large common part, a small difference), are loaded in bfloat16 by the
transformers backend, and every step score must equal the float64 readout of the same bf16
hidden states to 1e-5, where rounding the head's outputs to bf16 is off by more than 1e-3 (asserted
too, so the check has teeth). The SGLang PRM engine gets ``--enable-fp32-lm-head``, checked
against the installed SGLang's own argument parser.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from ets.engine.launcher import build_command
from ets.reward.backends.sglang_backend import FP32_HEAD_FLAG
from ets.reward.backends.transformers_backend import TransformersBackend
from ets.reward.metrics import RewardMetrics
from ets.reward.settings import RewardServerConfig, build_backend

# Common part of the two head rows: logits of magnitude ~SCALE at typical (RMS-normed) hidden states.
SCALE = 24.0
TRAJECTORIES = [
    ("What is 3 + 5?", ["we add the numbers", "so 3 + 5 = 8", "The answer is 8"]),
    ("What is 2x if x = 4?", ["2x = 2 * 4", "2x = 8", "The answer is 8"]),
    ("Compute 7 * 6.", ["7 * 6 = 42", "so the answer is 42"]),
    ("What is 10 - 3?", ["10 - 3 = 7", "The answer is 7"]),
]


def _reshape_head(rows: torch.Tensor, generator: torch.Generator, *, alternate: bool = False) -> None:
    """rows (k, hidden), in place: a shared direction times SCALE plus a small per-row part, so
    every logit is large while their differences stay near 0 (scores near 0.5). ``alternate``
    (llemma's whole vocabulary): the shared direction with alternating signs plus a small shared
    offset, so the vocabulary mean is near 0 too while each logit is large."""
    hidden = rows.shape[1]
    common = torch.randn(hidden, generator=generator) / hidden ** 0.5 * SCALE
    small = torch.randn(rows.shape, generator=generator) / hidden ** 0.5 * 0.3
    if alternate:
        signs = torch.tensor([(-1.0) ** v for v in range(rows.shape[0])]).unsqueeze(1)
        rows.copy_(signs * common + small + torch.randn(hidden, generator=generator) / hidden ** 0.5)
    else:
        rows.copy_(common + small)


def _realistic(tiny: Path, kind: str, out: Path) -> Path:
    """A copy of the tiny PRM with its readout head at a 7B PRM's logit scale."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

    g = torch.Generator().manual_seed(7)
    if kind == "qwen-prm":
        model: Any = AutoModelForTokenClassification.from_pretrained(tiny, dtype=torch.float32)
        with torch.no_grad():
            _reshape_head(model.score.weight, g)
            if model.score.bias is not None:
                model.score.bias.zero_()
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
        model.config.tie_word_embeddings = False
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        with torch.no_grad():
            if kind == "llemma":
                _reshape_head(head.weight, g, alternate=True)  # every vocabulary row
            else:
                tok = AutoTokenizer.from_pretrained(tiny)
                ids = [tok.convert_tokens_to_ids(t) for t in ("+", "-")]
                _reshape_head(head.weight[ids], g)
                pair = head.weight[ids].clone()
                _reshape_head(pair, g)
                head.weight[ids] = pair
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(out)
    return out


def _reference(backend: TransformersBackend, enc: Any) -> tuple[list[float], list[float]]:
    """float64 readout of the backend's own bf16 hidden states at the score positions, and the
    same readout with the head's outputs rounded to bf16 (what the backend did before)."""
    model = backend.model
    ids = torch.tensor([list(enc.last_step_prompt())])  # what the backend runs: up to the last score position
    with torch.inference_mode():
        hidden = model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
    h = hidden[list(enc.score_positions)]
    readout = backend.adapter.readout
    if readout == "class_head":
        w, b = model.score.weight, model.score.bias
        logits = h.double() @ w.double().T + (b.double() if b is not None else 0.0)
        rounded = (h.float() @ w.float().T + (b.float() if b is not None else 0.0)).bfloat16().double()
        exact = logits.softmax(-1)[:, 1]
        return exact.tolist(), rounded.softmax(-1)[:, 1].tolist()
    head = model.get_output_embeddings()
    if readout == "pair":
        w = head.weight[[backend.adapter.plus_id, backend.adapter.minus_id]]
        logits = h.double() @ w.double().T
        rounded = (h.float() @ w.float().T).bfloat16().double()
        return (torch.sigmoid(logits[:, 0] - logits[:, 1]).tolist(),
                torch.sigmoid(rounded[:, 0] - rounded[:, 1]).tolist())
    logits = h.double() @ head.weight.double().T
    rounded = (h.float() @ head.weight.float().T).bfloat16().double()
    return torch.sigmoid(logits.mean(-1)).tolist(), torch.sigmoid(rounded.mean(-1)).tolist()


@pytest.mark.parametrize("kind", ["math-shepherd", "llemma", "qwen-prm"])
async def test_bf16_model_scores_in_fp32(kind: str, tmp_path: Path,
                                         tiny_model_factory: Callable[[str], Path]) -> None:
    path = _realistic(tiny_model_factory(kind), kind, tmp_path / kind)
    backend = TransformersBackend(str(path), kind, dtype="bfloat16")
    await backend.start()
    try:
        worst_fp32 = worst_bf16 = 0.0
        spread: list[float] = []
        for question, steps in TRAJECTORIES:
            enc = backend.adapter.encode(question, steps)
            # One trajectory per call: no padding, so the hidden states are bitwise the reference's.
            got = (await backend.score([enc], False)).scores[0]
            exact, rounded = _reference(backend, enc)
            assert len(got) == len(exact) == len(steps)
            worst_fp32 = max(worst_fp32, *(abs(a - b) for a, b in zip(got, exact, strict=True)))
            worst_bf16 = max(worst_bf16, *(abs(a - b) for a, b in zip(rounded, exact, strict=True)))
            spread += exact
        assert max(spread) - min(spread) > 0.01 and 0.02 < min(spread) and max(spread) < 0.98, spread
        # llemma's vocabulary mean averages the rounding over the vocabulary: smaller, still 10x the bound.
        assert worst_bf16 > (1e-4 if kind == "llemma" else 1e-3), f"bf16 would not matter here ({worst_bf16})"
        assert worst_fp32 < 1e-5, f"scores off the fp32 readout by {worst_fp32} (bf16 rounding: {worst_bf16})"
    finally:
        await backend.close()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_spawned_sglang_prm_gets_the_fp32_lm_head(device: str, tiny_model_factory: Callable[[str], Path]) -> None:
    """The reward server's PRM engine launch carries --enable-fp32-lm-head, and the installed SGLang
    (0.5.23) parses it into exec.features.enable_fp32_lm_head."""
    from sglang.srt.server_args import ServerArgs

    config = RewardServerConfig(prm_model=str(tiny_model_factory("math-shepherd")), prm_type="math-shepherd",
                                prm_backend="sglang", device=device)
    backend: Any = build_backend(config, RewardMetrics())
    argv = build_command(backend.supervisor.launch, base_env={}).argv
    assert argv.count(FP32_HEAD_FLAG) == 1, argv
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    assert parser.parse_args(argv[3:]).enable_fp32_lm_head is True

