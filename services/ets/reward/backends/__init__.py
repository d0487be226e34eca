"""PRM backends behind one interface: ``transformers`` (in-process), ``sglang`` (a supervised
or attached SGLang server) and ``rules`` (model-free types such as ``arithmetic``). All take
adapter-encoded trajectories and return per-step scores.

Owns the ``PrmBackend`` protocol, ``ScoreOutcome``, ``BackendUnavailable``, ``ModelBackend`` (the
tokenizer, adapter and input limit both model backends load alike) and the readout arithmetic
shared by both paths (so the two differ only in how they obtain logits).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from ets.engine.supervisor import EngineUnavailable
from ets.reward.adapters import EncodedTrajectory, PrmAdapter, PrmOptions, make_adapter

BACKENDS: tuple[str, ...] = ("sglang", "transformers", "rules")

# The PRM engine cannot answer right now (down, restarting, unreachable): gRPC UNAVAILABLE. One
# class with the engine supervisor's, so what it raises needs no translation.
BackendUnavailable = EngineUnavailable


@dataclass(frozen=True)
class ScoreOutcome:
    """Per-trajectory step scores plus engine accounting (0 where the backend has none)."""

    scores: list[list[float]]
    prompt_tokens: int = 0
    cached_tokens: int = 0


class PrmBackend(Protocol):
    name: str
    adapter: PrmAdapter
    # Longest input (tokens) the PRM accepts.
    max_tokens: int

    async def start(self) -> None:
        """Load or launch the model; return when it can score (raise on a fatal problem)."""
        ...

    def is_up(self) -> bool:
        ...

    def set_health_listener(self, listener: Callable[[bool], None]) -> None:
        """Called with True/False whenever the backend comes up or goes down."""
        ...

    async def score(self, encoded: Sequence[EncodedTrajectory], last_step_only: bool) -> ScoreOutcome:
        ...

    async def close(self) -> None:
        ...


class InProcessHealth:
    """Health of a backend that runs in the reward server's own process (no engine to watch):
    up from ``start`` until ``close``; the listener hears each change."""

    _up: bool = False
    _listener: Callable[[bool], None] | None = None

    def _set_up(self, up: bool) -> None:
        if up != self._up:
            self._up = up
            if self._listener is not None:
                self._listener(up)

    def is_up(self) -> bool:
        return self._up

    def set_health_listener(self, listener: Callable[[bool], None]) -> None:
        self._listener = listener


def check_model_ref(model_path: str) -> None:
    """Accept a local model folder or a hub id (``org/name``, fetched by transformers/SGLang on
    hosts with hub access); refuse an empty value or a local path that is not there."""
    from pathlib import Path

    from ets.reward.adapters import AdapterError

    if not model_path:
        raise AdapterError("ETS_PRM_MODEL", "required: a model folder or hub id")
    local = model_path.startswith(("/", ".", "~")) or model_path.count("/") != 1
    if local and not Path(model_path).expanduser().is_dir():
        raise AdapterError("ETS_PRM_MODEL", f"model folder {model_path!r} does not exist")


def load_tokenizer(model_path: str, prm_type: str, options: PrmOptions | None) -> tuple[Any, PrmAdapter, int]:
    """What both model backends load first: the PRM's tokenizer (after ``check_model_ref``), the
    adapter of ``prm_type`` over it, and the tokenizer's input limit (4096 when it states none;
    each backend lowers it to the model's ``max_position_embeddings``)."""
    from transformers import AutoTokenizer

    check_model_ref(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    adapter = make_adapter(prm_type, tokenizer, options)
    return tokenizer, adapter, int(getattr(tokenizer, "model_max_length", 4096) or 4096)


class ModelBackend:
    """What both model backends (``sglang``, ``transformers``) share: the tokenizer, adapter and
    input limit of ``load_tokenizer``, the model and PRM type they serve, and the limit lowered to
    the model's ``max_position_embeddings``."""

    def __init__(self, model_path: str, prm_type: str, options: PrmOptions | None) -> None:
        self.tokenizer, self.adapter, self.max_tokens = load_tokenizer(model_path, prm_type, options)
        self.model_path = model_path
        self.prm_type = prm_type

    def _limit_to_model(self, config: Any) -> None:
        """Lower ``max_tokens`` to what the model's config (``AutoConfig``) says it can take, if it says."""
        limit = getattr(config, "max_position_embeddings", None)
        if limit:
            self.max_tokens = min(self.max_tokens, int(limit))


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def pair_score(logit_plus: float, logit_minus: float) -> float:
    """P("+") of the softmax over ["+", "-"]: sigmoid of the difference. Log-probabilities work
    as well as logits here because the shared log-normaliser cancels."""
    return sigmoid(logit_plus - logit_minus)
