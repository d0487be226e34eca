"""The ``sglang`` PRM backend: score through an SGLang server's native ``/generate``.

Owns ``SglangBackend``: scoring requests with no generation, through an
``ets.engine.supervisor.EngineSupervisor`` that either runs a local SGLang PRM server (port 30001 by
default; restarted with backoff, dies with the reward server) or attaches to an already-running
URL (``ETS_PRM_URL``; tests, k8s sidecars) and only watches its ``/health``. Either way it reports
up/down so the gRPC health status follows it. Pair types (math-shepherd and rlhflow
  read "+"/"-", judge "Yes"/"No") ask for ``token_ids_logprob: [plus_id, minus_id]`` with
  ``max_new_tokens: 0``: the newest step
  is the prompt's next-token distribution (``output_token_ids_logprobs``), earlier steps come from
  ``input_token_ids_logprobs`` (element k predicts token ``logprob_start_len + k``).
  ``logprob_start_len`` is the first score position, because with ``return_logprob`` SGLang caps
  prefix-cache reuse at it: the question and the already-scored steps stay cached.
  llemma needs the vocabulary mean of the LM-head logits, which log-probabilities cannot give
  (the log-normaliser is unknown). SGLang does return the final (post-norm) hidden states with
  ``return_hidden_states`` when launched with ``--enable-return-hidden-states``; the mean logit
  is then ``h . mean_row(W_lm_head)``, with the head's mean row read once from the checkpoint.
  qwen-prm (a 2-class head) is not served by SGLang 0.5.23: refused at startup.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from ets.engine.supervisor import EngineSupervisor
from ets.reward.adapters import AdapterError, EncodedTrajectory, PrmOptions, make_adapter
from ets.reward.backends import ModelBackend, ScoreOutcome, pair_score, sigmoid

SGLANG_TYPES = ("math-shepherd", "rlhflow", "llemma", "judge")
HIDDEN_STATES_FLAG = "--enable-return-hidden-states"
# The LM head in fp32 (SGLang 0.5.23, exec.features.enable_fp32_lm_head): without it a bf16 model
# rounds the "+"/"-" logits to bf16 before the log-softmax; at logits of 16-32 bf16 steps are
# 0.125, enough to move a step score near 0.5 by ~0.03 and reorder close candidates.
FP32_HEAD_FLAG = "--enable-fp32-lm-head"


def load_head_mean(model_path: str) -> tuple[list[float], float]:
    """Mean row (and mean bias) of the checkpoint's LM head: sum_v (W_v . h) / V = mean_row . h.
    Reads only that tensor from the safetensors shards (tied heads use the input embedding)."""
    import torch
    from safetensors import safe_open

    if not Path(model_path).is_dir():
        # A hub id: fetch the same files SGLang loads (the weights are in the shared HF cache).
        from huggingface_hub import snapshot_download

        model_path = snapshot_download(model_path, allow_patterns=["*.safetensors", "config.json"])
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise AdapterError("ETS_PRM_MODEL", f"llemma on sglang needs the safetensors checkpoint in {model_path}")
    config = json.loads((Path(model_path) / "config.json").read_text())
    names = ["lm_head.weight"]
    if config.get("tie_word_embeddings"):
        names.append("model.embed_tokens.weight")
    weight = bias = None
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            keys = set(st.keys())
            for name in names:
                if weight is None and name in keys:
                    weight = st.get_tensor(name)
            if bias is None and "lm_head.bias" in keys:
                bias = st.get_tensor("lm_head.bias")
    if weight is None:
        raise AdapterError("ETS_PRM_MODEL", f"no LM head ({' / '.join(names)}) in {model_path}")
    mean_bias = float(bias.float().mean()) if bias is not None else 0.0
    return weight.to(torch.float32).mean(dim=0).tolist(), mean_bias


class SglangBackend(ModelBackend):
    name = "sglang"

    def __init__(self, model_path: str, prm_type: str, supervisor: EngineSupervisor, *,
                 options: PrmOptions | None = None, request_timeout_s: float = 120.0,
                 reuse_prefix: bool = True) -> None:
        if prm_type not in SGLANG_TYPES:
            if prm_type == "qwen-prm":
                raise AdapterError(
                    "ETS_PRM_BACKEND", "prm_type qwen-prm (a 2-class head, Qwen2ForProcessRewardModel) is not "
                    "served by SGLang 0.5.23; use ETS_PRM_BACKEND=transformers"
                )
            make_adapter(prm_type, None)  # raises the unknown-type error naming ETS_PRM_TYPE
        # The tokenizer is loaded here even when attaching by ETS_PRM_URL: scoring sends token ids.
        super().__init__(model_path, prm_type, options)
        self.supervisor = supervisor
        self.request_timeout_s = request_timeout_s
        # False = logprob_start_len 0 (every call recomputes the whole prompt): the naive way,
        # kept for bench/reward_scoring.py's comparison.
        self.reuse_prefix = reuse_prefix
        try:
            from transformers import AutoConfig

            self._limit_to_model(AutoConfig.from_pretrained(model_path))
        except (OSError, ValueError):
            pass
        self._head_mean: Any = None
        self._head_bias = 0.0
        # Scores in fp32: a spawned PRM engine always gets the fp32 LM head (an attached one,
        # ETS_PRM_URL, is the operator's to launch with it: docs/reward-server.md).
        self._add_launch_flag(FP32_HEAD_FLAG)
        if self.adapter.readout == "mean_logit":
            import torch

            mean, self._head_bias = load_head_mean(model_path)
            self._head_mean = torch.tensor(mean, dtype=torch.float32)
            self._add_launch_flag(HIDDEN_STATES_FLAG)

    def _add_launch_flag(self, flag: str) -> None:
        launch = self.supervisor.launch
        if launch is not None and flag not in launch.extra_args:
            self.supervisor.launch = launch.replace(extra_args=tuple(launch.extra_args) + (flag,))

    async def start(self) -> None:
        await self.supervisor.start()
        if self.adapter.readout == "mean_logit":
            # An attached server launched without the flag answers without hidden states: say so now.
            probe = self.adapter.encode("1 + 1 = ?", ["2"])
            try:
                await self.score([probe], True)
            except RuntimeError as exc:
                raise AdapterError("ETS_PRM_URL", f"llemma on sglang needs the PRM server launched with "
                                   f"{HIDDEN_STATES_FLAG}: {exc}") from None

    def is_up(self) -> bool:
        return self.supervisor.is_up()

    def set_health_listener(self, listener: Callable[[bool], None]) -> None:
        self.supervisor.add_listener(listener)

    async def close(self) -> None:
        await self.supervisor.close()

    async def score(self, encoded: Sequence[EncodedTrajectory], last_step_only: bool) -> ScoreOutcome:
        if not encoded:
            return ScoreOutcome(scores=[])
        prompts = [list(e.last_step_prompt()) for e in encoded]
        wanted = [(e.score_positions[-1:] if last_step_only else e.score_positions) for e in encoded]
        starts = [w[0] for w in wanted] if self.reuse_prefix else [0] * len(wanted)
        body: dict[str, Any] = {
            "input_ids": prompts,
            "return_logprob": True,
            "logprob_start_len": starts,
        }
        if self.adapter.readout == "pair":
            body["sampling_params"] = {"max_new_tokens": 0}
            body["token_ids_logprob"] = [self.adapter.plus_id, self.adapter.minus_id]
        else:
            # Hidden states only come back when one token is generated (observed on 0.5.23); the
            # sampled token is discarded.
            body["sampling_params"] = {"max_new_tokens": 1, "temperature": 0.0}
            body["return_hidden_states"] = True
        outs = await self.supervisor.post("/generate", body, self.request_timeout_s)
        if isinstance(outs, dict):
            outs = [outs]
        if len(outs) != len(prompts):
            raise RuntimeError(f"SGLang returned {len(outs)} results for {len(prompts)} prompts")
        scores: list[list[float]] = []
        prompt_tokens = cached = 0
        for prompt, pos, start, out in zip(prompts, wanted, starts, outs, strict=True):
            meta = out["meta_info"]
            prompt_tokens += int(meta.get("prompt_tokens", len(prompt)))
            cached += int(meta.get("cached_tokens", 0) or 0)
            if self.adapter.readout == "pair":
                scores.append([self._pair_at(meta, prompt, p, start) for p in pos])
            else:
                scores.append(self._mean_logit_at(meta, prompt, pos))
        return ScoreOutcome(scores=scores, prompt_tokens=prompt_tokens, cached_tokens=cached)

    def _pair_at(self, meta: dict[str, Any], prompt: list[int], pos: int, start: int) -> float:
        # The output at position p predicts token p + 1: past the prompt's end that is the
        # next-token distribution, inside it input element (p + 1 - start).
        if pos == len(prompt) - 1:
            entry = meta["output_token_ids_logprobs"][0]
        else:
            entry = meta["input_token_ids_logprobs"][pos + 1 - start]
        if not entry:
            raise RuntimeError(f"SGLang returned no token_ids_logprob at position {pos}")
        lp = {int(tok): float(val) for val, tok, _ in entry}
        return pair_score(lp[self.adapter.plus_id], lp[self.adapter.minus_id])  # type: ignore[index]

    def _mean_logit_at(self, meta: dict[str, Any], prompt: list[int], positions: Sequence[int]) -> list[float]:
        import torch

        hs = meta.get("hidden_states")
        if not hs:
            raise RuntimeError("SGLang returned no hidden_states")
        rows = torch.tensor(hs[0], dtype=torch.float32).reshape(-1, self._head_mean.shape[0])
        # Rows cover the prompt tokens SGLang computed (the uncached tail), ending at the last one.
        first = len(prompt) - rows.shape[0]
        out = []
        for p in positions:
            if p < first:
                raise RuntimeError(f"SGLang returned hidden states from position {first}, score position is {p}")
            out.append(sigmoid(float(rows[p - first] @ self._head_mean) + self._head_bias))
        return out
