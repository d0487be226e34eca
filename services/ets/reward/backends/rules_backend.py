"""The ``rules`` PRM backend: PRM types scored by rules on the step text, with no model.

Serves ``arithmetic`` (ets.reward.rules) and ``grounded-arithmetic`` (ets.reward.grounded, which
also reads the question). It has the same interface as the model backends so the
reward server validates, meters and answers exactly as for them; it is up as soon as it starts.
Its "adapter" encodes no tokens: it hands the plain step texts through (``EncodedTrajectory.steps``).
"""
from __future__ import annotations

import asyncio
from typing import Sequence

from ets.reward.prm_types import MODEL_FREE_PRM_TYPES, PRM_TYPES
from ets.reward.adapters import AdapterError, EncodedTrajectory, PrmAdapter
from ets.reward.backends import InProcessHealth, ScoreOutcome
from ets.reward import grounded, rules

# No tokens are counted, so no token limit applies (the gRPC message size bounds a request).
UNLIMITED_TOKENS = 1 << 62


def score_rules(prm_type: str, question: str, steps: Sequence[str]) -> list[float]:
    """Each step's score under the rule-based ``prm_type`` (the solution so far)."""
    if prm_type == "grounded-arithmetic":
        return grounded.score_steps(question, steps)
    return rules.score_steps(steps)


class TextAdapter(PrmAdapter):
    """Passes (question, steps) through as text: rule-based types read words, not token ids."""

    readout = "pair"  # unused: nothing is read from a model

    def __init__(self, prm_type: str) -> None:
        super().__init__(tokenizer=None)
        self.name = prm_type

    def encode(self, question: str, steps: Sequence[str]) -> EncodedTrajectory:
        return EncodedTrajectory(input_ids=(), score_positions=tuple(range(len(steps))),
                                 steps=tuple(s.strip() for s in steps), question=question)


class RulesBackend(InProcessHealth):
    name = "rules"
    max_tokens = UNLIMITED_TOKENS

    def __init__(self, prm_type: str) -> None:
        if prm_type not in MODEL_FREE_PRM_TYPES:
            known = prm_type in PRM_TYPES
            raise AdapterError("ETS_PRM_TYPE", f"the rules backend serves {list(MODEL_FREE_PRM_TYPES)}, not "
                               f"{prm_type!r}" + ("" if not known else " (a model type: use sglang or transformers)"))
        self.prm_type = prm_type
        self.adapter: PrmAdapter = TextAdapter(prm_type)

    async def start(self) -> None:
        self._set_up(True)

    async def score(self, encoded: Sequence[EncodedTrajectory], last_step_only: bool) -> ScoreOutcome:
        # Each step's score depends on the steps before it, so every step is checked either way;
        # regular expressions over a batch take milliseconds, off the event loop all the same.
        full = await asyncio.to_thread(lambda: [score_rules(self.prm_type, e.question, e.steps) for e in encoded])
        return ScoreOutcome(scores=[s[-1:] if last_step_only else s for s in full])

    async def close(self) -> None:
        self._set_up(False)
