"""The two small interfaces the search loop is written against.

The loop never does I/O itself: it asks a ``StepGenerator`` to expand nodes into sampled steps
and a ``StepScorer`` to score and embed steps. The service plugs in the SGLang policy client and
the reward-server client; tests plug in deterministic in-process sources.

The loop knows nothing of how a policy model writes: the generator also says what a sampled
step means (``StepGenerator.read_step``: its plain text for the PRM and the embedder, and whether
it ends the solution), from its policy model type (``ets.policy.model_types``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

import numpy as np

# Why the policy stopped generating a step.
#   "step": the step delimiter (stop string) matched; "eos": end of sequence;
#   "length": max_new_tokens reached.
StepFinish = Literal["step", "eos", "length"]


@dataclass(frozen=True)
class Root:
    """The search's root: the question and its prompt, formatted for the policy and tokenized by
    the caller (``ets.policy.model_types.PolicyModelType.format_root``)."""

    question: str
    prompt_ids: tuple[int, ...]


@dataclass(frozen=True)
class ExpandRequest:
    """Sample ``n`` continuations of one node.

    ``prefix_ids`` is the node's full token sequence (root prompt included), exactly as the
    engine saw it, so a child's prefix is its parent's ids plus the child's new ids and the
    engine's radix cache always matches the shared prefix.

    ``seed`` is a deterministic per-node seed (None: unseeded); an adapter that sends the ``n``
    samples as separate engine requests must derive distinct per-sample seeds from it (e.g.
    ``seed + k``), or the samples come out identical. ``max_new_tokens``, when set, overrides
    ``StepParams.max_new_tokens`` for this node: the loop lowers it near ``max_tokens`` so a
    trajectory never exceeds its token budget.
    """

    prefix_ids: Sequence[int]
    n: int
    seed: int | None = None
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class SampledStep:
    """One sampled step: the new tokens only, their text, and engine accounting."""

    token_ids: tuple[int, ...]
    text: str
    finish: StepFinish
    # Engine accounting of the request this sample came from, split evenly over its samples by
    # the adapter so that sums over samples equal the engine's counts.
    prompt_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class StepParams:
    """Sampling parameters for one depth's expansions."""

    max_new_tokens: int
    temperature: float


@dataclass(frozen=True)
class StepReading:
    """What a sampled step's text means to the search: ``plain_text`` is the step without its
    delimiter (what the PRM and the embedder see); ``ends_solution``: it holds the final answer
    (the trajectory finishes with reason "answer")."""

    plain_text: str
    ends_solution: bool


class StepGenerator(Protocol):
    """Expands nodes into sampled steps (the policy), and reads them."""

    async def expand(self, requests: Sequence[ExpandRequest], params: StepParams) -> list[list[SampledStep]]:
        """Return, for each request in order, exactly ``request.n`` sampled steps."""
        ...

    def read_step(self, text: str) -> StepReading:
        """What the step ``text`` (as generated) means: its plain text and whether it ends the solution."""
        ...


@dataclass(frozen=True)
class ScoredTrajectory:
    """A trajectory to score: the question and its steps (plain step texts, oldest first)."""

    question: str
    steps: Sequence[str]


class StepScorer(Protocol):
    """Scores steps with the PRM and embeds step texts (the reward server)."""

    async def score_last_steps(self, trajectories: Sequence[ScoredTrajectory]) -> list[float]:
        """Return the PRM score in [0, 1] of each trajectory's newest step."""
        ...

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Return an (len(texts), dim) array of L2-normalised embeddings."""
        ...
