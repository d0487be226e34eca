"""In-process step sources and ``Upstreams`` for tests: a scripted policy, a table scorer, and
``ScriptedUpstreams`` that serve them to the search service without any model server.

``ScriptedPolicy`` is a tiny policy, not a mock of a server: each step it emits is a token
sequence whose first id names the step, so it reads the path back from ``prefix_ids`` and answers
from a script (path of step texts -> children). ``TableScorer`` scores a step by its text.
``ScriptedUpstreams`` adds what a service test needs around them: a pause on every expansion
(to hold searches in flight), an error to raise from the policy or the reward side, and a
probe result, so the search server's deadline, cancel, queue-full, error-mapping and success
paths run in seconds on a real gRPC server.
"""
from __future__ import annotations

import asyncio
from typing import Any, Mapping, Sequence, cast, get_args

import numpy as np

from ets.search.config import SearchConfig
from ets.search.interfaces import (
    ExpandRequest,
    Root,
    SampledStep,
    ScoredTrajectory,
    StepFinish,
    StepGenerator,
    StepParams,
    StepReading,
    StepScorer,
)
from ets.policy.model_types import policy_model_type

PROMPT = tuple([1] * 10)  # 10 root tokens
STEP_BASE = 1000  # first token of every step: STEP_BASE + index into the policy's step table

# (text, tokens, finish); finish is one of StepFinish's values, checked when the script is given
# (plain str, so scripts written as literals need no annotation).
Spec = tuple[str, int, str]
_FINISHES = frozenset(get_args(StepFinish))

# A tree on which the exact early stop decides before the end (test_search_early_stop: the loop;
# test_service_early_stop: through the service). Width 6. d1: three answers "8" and three open
# steps a, b, c; remaining 3: undecided (with "8" at 0.9: 2.7 vs a new answer's 3). d2: a and b
# give two more "8"s, c a step d; remaining 1: 4.5 > 0 + 1: decided, d is never expanded (the
# full search finishes it as "3" at depth 3).
EARLY_STOP_SCRIPT: dict[tuple[str, ...], Sequence[Spec]] = {
    (): [("The answer is 8 ки", 5, "step")] * 3 + [("a ки", 5, "step"), ("b ки", 5, "step"), ("c ки", 5, "step")],
    ("a ки",): [("The answer is 8 ки", 5, "step")],
    ("b ки",): [("The answer is 8 ки", 5, "step")],
    ("c ки",): [("d ки", 5, "step")],
    ("c ки", "d ки"): [("The answer is 3 ки", 5, "step")],
}


class ScriptedPolicy:
    """Expands a node from a script keyed by its path of step texts; unknown paths get a default
    child "<path depth>.<k> ки". Records every call."""

    def __init__(self, script: Mapping[Any, Sequence[Spec]] | None = None, step_tokens: int = 5,
                 model_type: str = "math-shepherd") -> None:
        bad = {f for specs in (script or {}).values() for _, _, f in specs} - _FINISHES
        if bad:
            raise ValueError(f"script finish reasons must be in {sorted(_FINISHES)}, got {sorted(bad)}")
        self.script: Mapping[tuple[str, ...], Sequence[Spec]] = script or {}
        self.step_tokens = step_tokens
        self.model_type = policy_model_type(model_type)  # how its steps read (" ки" ends a step)
        self.steps: list[str] = []
        self.calls: list[tuple[list[ExpandRequest], StepParams]] = []

    def read_step(self, text: str) -> StepReading:
        return StepReading(self.model_type.plain_step(text), self.model_type.has_answer(text))

    def path_of(self, prefix_ids: Sequence[int]) -> tuple[str, ...]:
        return tuple(self.steps[t - STEP_BASE] for t in prefix_ids if t >= STEP_BASE)

    async def expand(self, requests: Sequence[ExpandRequest], params: StepParams) -> list[list[SampledStep]]:
        self.calls.append((list(requests), params))
        out = []
        for r in requests:
            path = self.path_of(r.prefix_ids)
            specs = self.script.get(path)
            row = []
            for k in range(r.n):
                if specs:
                    text, ntok, finish = specs[k % len(specs)]
                else:
                    text, ntok, finish = f"{len(path) + 1}.{k} ки", self.step_tokens, "step"
                limit = params.max_new_tokens if r.max_new_tokens is None else r.max_new_tokens
                if ntok > limit:
                    ntok, finish = limit, "length"
                self.steps.append(text)
                ids = (STEP_BASE + len(self.steps) - 1,) + (2,) * (ntok - 1)
                row.append(SampledStep(ids, text, cast(StepFinish, finish), prompt_tokens=len(r.prefix_ids),
                                       cached_tokens=len(r.prefix_ids) - 1))
            out.append(row)
        return out


class TableScorer:
    """Scores the newest step by its plain text (default 0.5); embeds texts by a hash, so equal
    texts get equal embeddings."""

    def __init__(self, table: dict[str, float] | None = None) -> None:
        self.table = table or {}
        self.score_calls: list[list[ScoredTrajectory]] = []
        self.embed_calls: list[list[str]] = []

    async def score_last_steps(self, trajectories: Sequence[ScoredTrajectory]) -> list[float]:
        self.score_calls.append(list(trajectories))
        return [self.table.get(t.steps[-1], 0.5) for t in trajectories]

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.embed_calls.append(list(texts))
        rows = [np.random.default_rng(abs(hash(t)) % (2**32)).standard_normal(16) for t in texts]
        e = np.array(rows)
        return e / np.linalg.norm(e, axis=1, keepdims=True)


class _Gated:
    """The generator and scorer as a search sees them: each call first passes the upstreams'
    pause and failure switches."""

    def __init__(self, up: "ScriptedUpstreams") -> None:
        self._up = up

    async def expand(self, requests: Sequence[ExpandRequest], params: StepParams) -> list[list[SampledStep]]:
        self._up.expansions += 1
        await self._up.pass_gate()
        if self._up.policy_error is not None:
            raise self._up.policy_error
        return await self._up.policy.expand(requests, params)

    def read_step(self, text: str) -> StepReading:
        return self._up.policy.read_step(text)

    async def score_last_steps(self, trajectories: Sequence[ScoredTrajectory]) -> list[float]:
        if self._up.reward_error is not None:
            raise self._up.reward_error
        return await self._up.scorer_.score_last_steps(trajectories)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._up.reward_error is not None:
            raise self._up.reward_error
        return await self._up.scorer_.embed(texts)


class ScriptedUpstreams:
    """``ets.service.runner.Upstreams`` over a ``ScriptedPolicy`` and a ``TableScorer``.

    ``hold()`` makes every expansion wait until ``release()``; ``policy_error`` /
    ``reward_error`` are raised by the next policy / reward call (e.g. an
    ``ets.service.status.UpstreamUnavailable``); ``probe_result`` is what readiness sees."""

    policy_address = "scripted-policy"
    reward_address = "scripted-reward"
    policy_model = "scripted-policy-model"

    def __init__(self, policy: ScriptedPolicy | None = None, scorer: TableScorer | None = None) -> None:
        self.policy = policy or ScriptedPolicy()
        self.scorer_ = scorer or TableScorer()
        self.policy_error: BaseException | None = None
        self.reward_error: BaseException | None = None
        self.probe_result: dict[str, str | None] = {"policy": None, "reward": None}
        self.expansions = 0
        self.prm_types: list[str] = []
        self.system_prompts: list[str | None] = []  # each root's system prompt, in order
        self.closed = False
        self._gate: asyncio.Event | None = None
        self._held = 0

    # -- switches ----------------------------------------------------------------------------------
    def hold(self) -> None:
        self._gate = asyncio.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()
            self._gate = None

    @property
    def waiting(self) -> int:
        """Expansions now waiting at the gate."""
        return self._held

    async def pass_gate(self) -> None:
        gate = self._gate
        if gate is None:
            return
        self._held += 1
        try:
            await gate.wait()
        finally:
            self._held -= 1

    # -- Upstreams -----------------------------------------------------------------------------------
    async def root(self, question: str, config: SearchConfig, system_prompt: str | None = None) -> Root:
        self.system_prompts.append(system_prompt)
        return Root(question, PROMPT)

    async def model_names(self) -> tuple[str, ...]:
        return (self.policy_model, f"/models/{self.policy_model}")  # as SGLang: served name, then path

    def generator(self, config: SearchConfig) -> StepGenerator:
        return _Gated(self)

    def scorer(self, config: SearchConfig, expect_prm_type: str = "") -> StepScorer:
        self.prm_types.append(expect_prm_type)
        return _Gated(self)

    async def probe(self) -> dict[str, str | None]:
        return dict(self.probe_result)

    async def close(self) -> None:
        self.closed = True
