"""The in-process ``transformers`` PRM backend: batched, padded forward passes in a worker thread.

Serves every PRM type, including those SGLang 0.5.23 cannot (qwen-prm's 2-class head) and CPU
deployments. Causal-LM types run the backbone once and apply the LM head only at the score
positions (one row pair for "+"/"-", the full head for the vocabulary mean); the 2-class head
types run the token-classification model. Concurrent requests are merged by ``MicroBatcher``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from ets.reward.adapters import AdapterError, EncodedTrajectory, PrmOptions
from ets.reward.backends import InProcessHealth, ModelBackend, ScoreOutcome
from ets.reward.batching import MicroBatcher

log = logging.getLogger(__name__)

# Padded tokens per forward call: bounds activation memory whatever the batch looks like.
DEFAULT_MAX_BATCH_TOKENS = 16384


class TransformersBackend(ModelBackend, InProcessHealth):
    name = "transformers"

    def __init__(self, model_path: str, prm_type: str, *, options: PrmOptions | None = None,
                 device: str = "cpu", dtype: str = "auto", max_batch_items: int = 64,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 on_batch: Callable[[int], None] | None = None) -> None:
        super().__init__(model_path, prm_type, options)
        self.device = device
        self.dtype = dtype
        self.max_batch_tokens = max_batch_tokens
        self.model: Any = None
        self._head_mean: Any = None  # llemma: the LM head's fp32 mean row
        self._head_bias = 0.0
        self._batcher: MicroBatcher[tuple[EncodedTrajectory, bool], list[float]] = MicroBatcher(
            self._score_sync, max_items=max_batch_items, name="prm-transformers", on_batch=on_batch
        )

    # -- lifecycle ----------------------------------------------------------------------------
    def _load(self) -> None:
        import torch
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.model_path, trust_remote_code=True)
        dtype: Any = "auto" if self.dtype == "auto" else getattr(torch, self.dtype)
        if self.adapter.readout == "class_head":
            archs = getattr(config, "architectures", None) or []
            if "Qwen2ForProcessRewardModel" in archs:
                # The real Qwen2.5-Math-PRM ships its head as remote code.
                from transformers import AutoModel

                model = AutoModel.from_pretrained(self.model_path, dtype=dtype, trust_remote_code=True)
            else:
                from transformers import AutoModelForTokenClassification

                model = AutoModelForTokenClassification.from_pretrained(self.model_path, dtype=dtype)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        self.model = model.to(self.device).eval()
        self._fp32_readout()
        self._limit_to_model(config)

    def _fp32_readout(self) -> None:
        """Score in fp32 whatever the model's dtype: in bf16 the head's outputs (logits of 16-32
        for a 7B PRM) are rounded to steps of 0.125, enough to move a step score near 0.5 by ~0.03
        and reorder close candidates. Causal-LM readouts take the head's rows in fp32 at scoring
        time; a class head (``score``: Linear, or the Qwen PRM's Linear-ReLU-Linear) is cast to
        fp32 here with its input, and llemma's vocabulary mean uses the head's fp32 mean row."""
        import torch

        self._head_mean = None
        if self.adapter.readout == "class_head":
            head = getattr(self.model, "score", None) or getattr(self.model, "classifier", None)
            if head is None:
                raise AdapterError("ETS_PRM_MODEL", f"{type(self.model).__name__} has no score/classifier head")
            head.float()
            head.register_forward_pre_hook(lambda _module, args: tuple(a.float() for a in args))
        elif self.adapter.readout == "mean_logit":
            head = self.model.get_output_embeddings()
            # mean_v (W_v . h + b_v) = mean_row(W) . h + mean(b): one fp32 row, summed in slices so
            # no fp32 copy of the whole head is made.
            total = torch.zeros(head.weight.shape[1], dtype=torch.float32, device=head.weight.device)
            for start in range(0, head.weight.shape[0], 4096):
                total += head.weight[start: start + 4096].float().sum(dim=0)
            self._head_mean = total / head.weight.shape[0]
            self._head_bias = float(head.bias.float().mean()) if head.bias is not None else 0.0

    async def start(self) -> None:
        import asyncio

        await asyncio.to_thread(self._load)
        self._set_up(True)

    async def close(self) -> None:
        await self._batcher.aclose()
        self._set_up(False)
        self.model = None

    # -- scoring ------------------------------------------------------------------------------
    async def score(self, encoded: Sequence[EncodedTrajectory], last_step_only: bool) -> ScoreOutcome:
        results = await self._batcher.submit([(e, last_step_only) for e in encoded])
        tokens = sum(len(e.last_step_prompt()) for e in encoded)
        return ScoreOutcome(scores=results, prompt_tokens=tokens, cached_tokens=0)

    def _score_sync(self, items: list[tuple[EncodedTrajectory, bool]]) -> list[list[float]]:
        import torch

        # Only the ids up to the last needed score position matter under causal attention.
        seqs = [e.last_step_prompt() for e, _ in items]
        wanted = [(e.score_positions[-1:] if last else e.score_positions) for e, last in items]
        order = sorted(range(len(items)), key=lambda i: len(seqs[i]))
        results: list[list[float]] = [[] for _ in items]
        chunk: list[int] = []
        with torch.inference_mode():
            for i in order:
                longest = len(seqs[i])  # sorted ascending: the newcomer is the longest
                if chunk and longest * (len(chunk) + 1) > self.max_batch_tokens:
                    self._forward_chunk(chunk, seqs, wanted, results)
                    chunk = []
                chunk.append(i)
            if chunk:
                self._forward_chunk(chunk, seqs, wanted, results)
        return results

    def _forward_chunk(self, chunk: list[int], seqs: list[tuple[int, ...]],
                       wanted: list[tuple[int, ...]], results: list[list[float]]) -> None:
        import torch

        pad_id = self.tokenizer.pad_token_id
        pad_id = 0 if pad_id is None else int(pad_id)
        width = max(len(seqs[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            # Right padding: real tokens keep positions 0..n-1, causal attention never sees pads.
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
            mask[row, : len(seqs[i])] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        rows = torch.tensor([r for r, i in enumerate(chunk) for _ in wanted[i]], dtype=torch.long, device=self.device)
        cols = torch.tensor([p for i in chunk for p in wanted[i]], dtype=torch.long, device=self.device)
        readout = self.adapter.readout
        if readout == "class_head":
            out = self.model(input_ids=ids, attention_mask=mask)
            logits = out.logits if hasattr(out, "logits") else out[0]  # fp32: the head is (_fp32_readout)
            probs = logits[rows, cols].float().softmax(dim=-1)[:, 1]
            flat = probs.tolist()
        else:
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            picked = hidden[rows, cols].float()
            if readout == "pair":
                head = self.model.get_output_embeddings()
                pm = torch.tensor([self.adapter.plus_id, self.adapter.minus_id], device=self.device)
                logits = picked @ head.weight[pm].float().T
                if head.bias is not None:
                    logits = logits + head.bias[pm].float()
                flat = torch.sigmoid(logits[:, 0] - logits[:, 1]).tolist()
            else:  # mean_logit: the vocabulary mean of the full LM-head logits
                flat = torch.sigmoid(picked @ self._head_mean + self._head_bias).tolist()
        offset = 0
        for i in chunk:
            n = len(wanted[i])
            results[i] = [float(x) for x in flat[offset: offset + n]]
            offset += n
