"""Search configuration as a pure value type: the one ``SearchConfig`` (the paper's defaults,
per-field validation, per-request overrides) and ``ValidConfig``.

Owns: ``SearchConfig`` (field names equal the proto ``SearchConfig`` fields), ``ValidConfig`` (a
config that passed ``validate()``: what a search carries from the edge to the loop, so it is
checked once) and the width presets of lambda_s. Errors are ``ConfigError`` (``ets.errors``; a
field by its config name).

The config carries ``policy_model_type`` and ``prm_type`` as names only: what they mean belongs
to the policy (``ets.policy.model_types``) and the reward server (``ets.reward.prm_types``), and
the edges check the names against those registries (``ets.config.validate``), as the method
name is checked against ``ets.search.selection``. Reading defaults from the environment is the
edge's too (``ets.config.search_defaults_from_env``). Pure: no I/O, imports nothing outside
``ets.search`` but ``ets.errors``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

from ets.errors import ConfigError

__all__ = ["AGGREGATIONS", "ConfigError", "MAX_DEPTH_LIMIT", "MAX_TOKENS_LIMIT", "MAX_WIDTH", "NODE_COSTS",
           "SearchConfig", "ValidConfig", "VOTINGS", "preset_lambda_s"]

AGGREGATIONS: tuple[str, ...] = ("last", "min", "mean", "prod")
VOTINGS: tuple[str, ...] = ("weighted_majority", "majority", "best")
NODE_COSTS: tuple[str, ...] = ("uniform", "tokens")

# Upper bound on width accepted from a request; a guard against runaway requests, not a limit of
# the algorithm (the selection benchmark runs width 1024).
MAX_WIDTH = 4096
MAX_DEPTH_LIMIT = 1000
MAX_TOKENS_LIMIT = 1 << 20

# The paper's width presets and their coverage weight lambda_s (reference hyper-parameters).
LAMBDA_S_PRESETS: dict[int, float] = {16: 1.5, 64: 1.4, 256: 1.45}


def preset_lambda_s(width: int) -> float:
    """lambda_s of the width preset nearest to ``width`` on a log scale (ties go to the smaller)."""
    if width <= 0:
        return LAMBDA_S_PRESETS[16]
    best = min(LAMBDA_S_PRESETS, key=lambda w: (abs(math.log2(width) - math.log2(w)), w))
    return LAMBDA_S_PRESETS[best]


# --------------------------------------------------------------------------------------------
# SearchConfig
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SearchConfig:
    """Everything one search needs to know; defaults are the paper's (width-16 preset).

    ``lambda_s=None`` means "follow the width preset" (1.5 / 1.4 / 1.45 for 16 / 64 / 256, the
    nearest preset on a log scale for other widths); ``resolved()`` fills it in.
    ``seed=None`` leaves sampling unseeded; ``beam_keep=None`` means ceil(sqrt(width)).
    """

    method: str = "ets"
    width: int = 16
    temperature: float = 1.0
    max_step_tokens: int = 256
    max_tokens: int = 1024
    max_depth: int = 25
    softmax_temperature: float = 0.2
    lambda_c: float = 1.0
    lambda_s: float | None = None
    # Cosine-distance cut of the coverage clustering, for the default embedder (MiniLM). The paper's
    # 0.05 was set for its math BERT; with MiniLM, 16 sampled SmolLM2 first steps form 15.6 clusters
    # at 0.05 (the coverage term then rewards every candidate alike) and 10.1 at 0.3
    # (bench/results/cluster_calibration.json, docs/evaluation.md). With the math BERT: 0.05.
    cluster_distance: float = 0.3
    aggregation: str = "last"
    voting: str = "weighted_majority"
    seed: int | None = None
    policy_model_type: str = "math-shepherd"
    prm_type: str = "math-shepherd"
    node_cost: str = "uniform"
    # Wall-clock limit of one ETS integer program; the best incumbent found by then is used.
    solver_time_limit_s: float = 0.5
    beam_keep: int | None = None
    # Exact early stop: stop expanding once the vote over the finished trajectories cannot change
    # whatever the remaining width adds (ets.search.answers.vote_decided; off: the paper's search).
    early_stop: bool = False

    # ---- derived values -------------------------------------------------------------------
    @property
    def effective_lambda_s(self) -> float:
        return preset_lambda_s(self.width) if self.lambda_s is None else float(self.lambda_s)

    @property
    def effective_beam_keep(self) -> int:
        return self.beam_keep if self.beam_keep is not None else max(1, math.ceil(math.sqrt(self.width)))

    def resolved(self) -> "SearchConfig":
        """A copy with every "follow the default" field made explicit (for echoing back); a
        ``ValidConfig`` stays one (the preset's lambda_s and ceil(sqrt(width)) are in range)."""
        return dataclasses.replace(
            self, lambda_s=self.effective_lambda_s, beam_keep=self.effective_beam_keep
        )

    # Equal by value whether checked or not: a ValidConfig equals the SearchConfig it was made from.
    def _values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(SearchConfig)}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SearchConfig):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(tuple(self._values().values()))

    # ---- overrides ----------------------------------------------------------------------------
    def replace(self, **overrides: Any) -> "SearchConfig":
        """A copy with ``overrides`` applied; ``None`` values mean "not set" and are ignored,
        so a request's unset optional fields keep the server defaults. Unknown names raise
        ConfigError. The result is a plain, unchecked ``SearchConfig`` (call ``validate()``)."""
        names = {f.name for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in names:
                raise ConfigError(key, "unknown configuration field")
            if value is None or (isinstance(value, str) and value == "" and key in _STRING_FIELDS):
                continue
            changes[key] = value
        return SearchConfig(**{**self._values(), **changes})

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> "ValidConfig":
        """Raise ConfigError(field, message) for the first invalid field; the config as a
        ``ValidConfig`` if valid (itself when it already is one: checked once).

        ``width`` is capped at ``MAX_WIDTH`` (a guard against runaway requests; the operator's
        lower cap is ``ETS_LIMIT_WIDTH``).
        ``method`` must name a registered selection method; the names live with the methods
        (``ets.search.selection.validate`` checks both)."""
        if isinstance(self, ValidConfig):
            return self
        if not isinstance(self.method, str) or not self.method.strip():
            raise ConfigError("method", f"must name a selection method, got {self.method!r}")
        _int("width", self.width)
        if not 1 <= self.width <= MAX_WIDTH:
            raise ConfigError("width", f"must be between 1 and {MAX_WIDTH}, got {self.width}")
        # 0 is greedy decoding (valid for the engine, if pointless for a tree search).
        _nonneg("temperature", self.temperature)
        _int("max_step_tokens", self.max_step_tokens)
        _int("max_tokens", self.max_tokens)
        if self.max_step_tokens < 1:
            raise ConfigError("max_step_tokens", f"must be >= 1, got {self.max_step_tokens}")
        _check_max_tokens(self.max_tokens, self.max_step_tokens)
        _int("max_depth", self.max_depth)
        if not 1 <= self.max_depth <= MAX_DEPTH_LIMIT:
            raise ConfigError("max_depth", f"must be between 1 and {MAX_DEPTH_LIMIT}, got {self.max_depth}")
        _positive("softmax_temperature", self.softmax_temperature)
        _nonneg("lambda_c", self.lambda_c)
        if self.lambda_s is not None:
            _nonneg("lambda_s", self.lambda_s)
        _nonneg("cluster_distance", self.cluster_distance)
        if self.cluster_distance > 2.0:
            raise ConfigError("cluster_distance", f"cosine distance is at most 2, got {self.cluster_distance}")
        _choice("aggregation", self.aggregation, AGGREGATIONS)
        _choice("voting", self.voting, VOTINGS)
        if self.seed is not None:
            _int("seed", self.seed)
            if not 0 <= self.seed < 2**64:
                raise ConfigError("seed", f"must be an unsigned 64-bit integer, got {self.seed}")
        # Names only here: the edges check them against the policy's and the reward server's registries.
        _name("policy_model_type", self.policy_model_type)
        _name("prm_type", self.prm_type)
        _choice("node_cost", self.node_cost, NODE_COSTS)
        _positive("solver_time_limit_s", self.solver_time_limit_s)
        if self.solver_time_limit_s > 600:
            raise ConfigError("solver_time_limit_s", f"must be at most 600 s, got {self.solver_time_limit_s}")
        if self.beam_keep is not None:
            _int("beam_keep", self.beam_keep)
            if not 1 <= self.beam_keep <= self.width:
                raise ConfigError("beam_keep", f"must be between 1 and width ({self.width}), got {self.beam_keep}")
        if not isinstance(self.early_stop, bool):
            raise ConfigError("early_stop", f"must be a boolean, got {self.early_stop!r}")
        return ValidConfig(**self._values())


class ValidConfig(SearchConfig):
    """A ``SearchConfig`` that passed ``validate()``: the type a search carries from the edge (the
    service's request checks) to the loop, which then does not check it again. Only ``validate()``
    makes one (``resolved()`` and ``with_max_tokens`` keep one valid); ``replace()`` returns a plain
    ``SearchConfig``, to be validated again."""

    def with_max_tokens(self, max_tokens: int) -> "ValidConfig":
        """This config with another ``max_tokens``, checking only the rules that involve it."""
        _int("max_tokens", max_tokens)
        _check_max_tokens(max_tokens, self.max_step_tokens)
        return dataclasses.replace(self, max_tokens=max_tokens)


def _check_max_tokens(max_tokens: int, max_step_tokens: int) -> None:
    if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise ConfigError("max_tokens", f"must be between 1 and {MAX_TOKENS_LIMIT}, got {max_tokens}")
    if max_step_tokens > max_tokens:
        raise ConfigError(
            "max_step_tokens",
            f"must not exceed max_tokens ({max_tokens}), got {max_step_tokens}",
        )


_STRING_FIELDS = frozenset({"method", "aggregation", "voting", "policy_model_type", "prm_type", "node_cost"})


def _choice(name: str, value: object, options: Sequence[str]) -> None:
    if value not in options:
        raise ConfigError(name, f"unknown {value!r}; expected one of {list(options)}")


def _name(name: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(name, f"must be a non-empty name, got {value!r}")


def _int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer, got {value!r}")


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value!r}")
    return float(value)


def _positive(name: str, value: object) -> None:
    if _number(name, value) <= 0:
        raise ConfigError(name, f"must be > 0, got {value!r}")


def _nonneg(name: str, value: object) -> None:
    if _number(name, value) < 0:
        raise ConfigError(name, f"must be >= 0, got {value!r}")
