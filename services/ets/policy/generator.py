"""``SGLangStepGenerator``: the search's ``StepGenerator`` on top of the SGLang policy client.

Owns how one depth's expansions become engine requests, and how a sampled step reads
(``read_step``: plain text and final answer, by the policy model type). Every sample of every
node goes out in ONE batched ``/generate`` call, each sample as its own prompt (the node's ids
repeated) with ``n = 1``, not SGLang's ``n``: a batch must use one ``n`` for all prompts while ETS
gives every candidate its own child count, ``n > 1`` costs sequential warmup round trips whose
prefill no sample accounts for, and per-sample seeds (``seed + k``) keep seeded samples distinct.
So each sample is one engine request, and its ``prompt_tokens`` / ``cached_tokens`` are the
engine's own numbers (sums over samples equal the engine's counters). Behind sglang-router (a
client with ``engine_url``) each prompt is its own concurrent ``/generate``, so the router can
route each by its prefix (``ets.policy.client``).

The new ids are exactly what the engine cached (stop-string tokens included), so a child's prefix
is ``parent ids + token_ids``; when a stop string ends inside a token, the few characters after
it are in the ids and in no step's text.

Prefill first: the engine's in-batch deferral does not save a prompt it has never seen (the
root's fan-out would prefill it once per sample). Before a call in which several samples share a
prefix this generator did not produce in its previous call (the root; a node replayed from a
sample store), it sends that prefix once as a prefill-only request (``max_new_tokens`` 0) and
awaits it; its accounting is added to the first sample of that prefix. What SGLang 0.5.23 was
observed to do, and the measurements behind these choices: docs/policy-server.md ("What SGLang
0.5.23 does") and docs/benchmarks.md ("Engine prefix reuse").
"""
from __future__ import annotations

from dataclasses import replace
from typing import AbstractSet, Mapping, Sequence

from ets.policy.client import PolicyClient, Sample, SamplingParams
from ets.policy.model_types import PolicyModelType, policy_model_type
from ets.search.interfaces import ExpandRequest, Root, SampledStep, StepFinish, StepParams, StepReading

_FINISH: dict[str, StepFinish] = {"stop": "step", "eos": "eos", "length": "length"}

# Samples that must share an unseen prefix in one call before it is prefilled first: one sample
# alone gains nothing from a warm cache and would pay an extra round trip.
PREFILL_MIN_SHARED = 2


def prefixes_to_prefill(requests: Sequence[ExpandRequest], produced: AbstractSet[tuple[int, ...]],
                        min_shared: int = PREFILL_MIN_SHARED) -> list[tuple[int, ...]]:
    """The prefixes of ``requests`` to send prefill-only before their batch, in first-seen order:
    each one that ``min_shared`` or more samples of the call share (summed over requests with the
    same prefix) and that is not in ``produced`` (prefixes whose KV the engine already holds but
    the last token: parent ids + sampled ids of this generator's previous call).
    ``min_shared`` < 1 turns prefilling off."""
    if min_shared < 1:
        return []
    shared: dict[tuple[int, ...], int] = {}
    for r in requests:
        if r.n > 0:
            key = tuple(r.prefix_ids)
            shared[key] = shared.get(key, 0) + r.n
    # A one-token prefix has nothing to cache: the engine computes a prompt's last token anyway.
    return [k for k, n in shared.items() if n >= min_shared and k not in produced and len(k) > 1]


def fold_prefill(out: list[list[SampledStep]], requests: Sequence[ExpandRequest],
                 prefilled: Mapping[tuple[int, ...], Sample]) -> list[list[SampledStep]]:
    """Add each prefill request's engine accounting to the first sample of its prefix (in place),
    so that the samples' ``prompt_tokens`` / ``cached_tokens`` still sum to the engine's counts."""
    left = dict(prefilled)
    for r, steps in zip(requests, out, strict=True):
        warm = left.pop(tuple(r.prefix_ids), None) if steps else None
        if warm is not None:
            steps[0] = replace(steps[0], prompt_tokens=steps[0].prompt_tokens + warm.prompt_tokens,
                               cached_tokens=steps[0].cached_tokens + warm.cached_tokens)
    return out


class SGLangStepGenerator:
    """Expands nodes by sampling steps from an SGLang policy server (one HTTP call per expand)."""

    def __init__(
        self,
        client: PolicyClient,
        model_type: PolicyModelType | str | None = None,
        *,
        stop: Sequence[str] | None = None,
        no_stop_trim: bool | None = None,
        stop_token_ids: Sequence[int] = (),
        top_p: float | None = None,
        logit_bias: Mapping[int, float] | None = None,
        prefill_min_shared: int = PREFILL_MIN_SHARED,
    ) -> None:
        """``model_type`` is a ``PolicyModelType`` or its registered name; explicit ``stop`` /
        ``no_stop_trim`` override it (or stand in for it). ``prefill_min_shared``: samples of one
        call that must share an unseen prefix before it is prefilled first (module docstring;
        0 turns it off)."""
        mt = policy_model_type(model_type) if isinstance(model_type, str) else model_type
        self.client = client
        self.model_type = mt
        if stop is None:
            stop = mt.stop if mt is not None else ()
        if no_stop_trim is None:
            no_stop_trim = mt.no_stop_trim if mt is not None else True
        self.stop: tuple[str, ...] = tuple(stop)
        self.no_stop_trim: bool = no_stop_trim
        self.stop_token_ids = tuple(stop_token_ids)
        self.top_p = top_p
        self.logit_bias = dict(logit_bias) if logit_bias else None
        self.prefill_min_shared = prefill_min_shared
        # Prefixes of the previous call's children (parent ids + sampled ids): the engine holds
        # each one's KV but the last token, so their own children need no prefill.
        self._produced: set[tuple[int, ...]] = set()
        if not self.stop and not self.stop_token_ids:
            raise ValueError("stop: a step generator needs the step delimiter (model_type or stop=)")

    def read_step(self, text: str) -> StepReading:
        """The step as the search reads it, by the policy model type: without its delimiter, and
        whether it holds a final-answer marker. Without a model type (explicit ``stop=`` only) a
        step is its stripped text and never ends the solution by itself (only eos or the budget)."""
        if self.model_type is None:
            return StepReading(plain_text=text.strip(), ends_solution=False)
        return StepReading(plain_text=self.model_type.plain_step(text),
                           ends_solution=self.model_type.has_answer(text))

    def _params(self, request: ExpandRequest, params: StepParams, k: int) -> SamplingParams:
        max_new = request.max_new_tokens if request.max_new_tokens is not None else params.max_new_tokens
        return SamplingParams(
            max_new_tokens=int(max_new), temperature=params.temperature, top_p=self.top_p,
            stop=self.stop, stop_token_ids=self.stop_token_ids, no_stop_trim=self.no_stop_trim,
            seed=None if request.seed is None else request.seed + k, logit_bias=self.logit_bias,
        )

    async def expand(self, requests: Sequence[ExpandRequest], params: StepParams) -> list[list[SampledStep]]:
        """For each request in order, exactly ``request.n`` sampled steps (one batched call)."""
        prompts: list[Sequence[int]] = []
        plist: list[SamplingParams] = []
        for r in requests:
            if r.n < 0:
                raise ValueError(f"n: must be >= 0, got {r.n}")
            for k in range(r.n):
                prompts.append(r.prefix_ids)
                plist.append(self._params(r, params, k))
        if not prompts:
            return [[] for _ in requests]
        warm = prefixes_to_prefill(requests, self._produced, self.prefill_min_shared)
        prefilled: dict[tuple[int, ...], Sample] = {}
        if warm:
            got = await self.client.generate(warm, SamplingParams(max_new_tokens=0, temperature=params.temperature))
            prefilled = {p: samples[0] for p, samples in zip(warm, got, strict=True)}
        flat = await self.client.generate(prompts, plist)
        out: list[list[SampledStep]] = []
        produced: set[tuple[int, ...]] = set()
        i = 0
        for r in requests:
            steps = [to_step(flat[i + k][0]) for k in range(r.n)]
            prefix = tuple(r.prefix_ids)
            produced.update(prefix + s.token_ids for s in steps)
            out.append(steps)
            i += r.n
        self._produced = produced
        return fold_prefill(out, requests, prefilled)


def to_step(sample: Sample) -> SampledStep:
    """A client ``Sample`` as the search's ``SampledStep`` (finish "stop" -> "step")."""
    return SampledStep(
        token_ids=sample.output_ids, text=sample.text, finish=_FINISH[sample.finish],
        prompt_tokens=sample.prompt_tokens, cached_tokens=sample.cached_tokens,
    )


async def tokenize_root(client: PolicyClient, question: str, model_type: PolicyModelType | str,
                        system_prompt: str | None = None) -> Root:
    """The search root for ``question``: formatted per the policy model type and tokenized by
    the policy server itself (``/tokenize``: its tokenizer and chat template), so the root ids are
    the ones the engine caches. ``model_type`` is a ``PolicyModelType`` or its name.
    ``system_prompt`` (a request's system message) goes into the chat template of chat-style
    types, replacing the type's own; step-style types have no template and do not use it."""
    mt = policy_model_type(model_type) if isinstance(model_type, str) else model_type
    if mt.chat:
        ids = await client.tokenize_chat(mt.root_messages(question, system_prompt))
    else:
        ids = await client.tokenize(mt.format_root(question), add_special_tokens=True)
    if not ids:
        raise ValueError("question: tokenized to an empty prompt")
    return Root(question=question, prompt_ids=tuple(ids))
