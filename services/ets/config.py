"""Search configuration: the one ``SearchConfig`` (paper defaults, validation, per-request and
environment overrides) and the model-type conventions the search relies on.

Owns: ``SearchConfig`` (field names equal the proto ``SearchConfig`` fields), ``ConfigError``,
the ``PolicyModelType`` registry (step delimiter, answer markers, root formatting) and the PRM
type names. Pure: no I/O except reading a given environment mapping in ``from_env`` (through
``ets.settings``, the one loader: every field is read from ``ETS_SEARCH_<FIELD>``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from ets import settings
from ets.errors import FieldError

AGGREGATIONS: tuple[str, ...] = ("last", "min", "mean", "prod")
VOTINGS: tuple[str, ...] = ("weighted_majority", "majority", "best")
NODE_COSTS: tuple[str, ...] = ("uniform", "tokens")
# Every PRM type the reward server serves (formats: ets.reward.adapters; rules: ets.reward.rules).
# The one list: the reward server and its adapters import it from here.
PRM_TYPES: tuple[str, ...] = ("math-shepherd", "rlhflow", "llemma", "qwen-prm", "judge", "arithmetic")
# Types scored by rules on the text, without a model (served by the reward server's ``rules`` backend).
MODEL_FREE_PRM_TYPES: tuple[str, ...] = ("arithmetic",)

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


class ConfigError(FieldError):
    """An invalid configuration value; ``field`` names the offending ``SearchConfig`` field."""


# --------------------------------------------------------------------------------------------
# Model-type conventions
# --------------------------------------------------------------------------------------------

LLAMA_INSTRUCT_SYSTEM_PROMPT = (
    "Solve the following math problem efficiently and clearly:\n\n"
    "- For simple problems (2 steps or fewer):\n"
    "Provide a concise solution with minimal explanation.\n\n"
    "- For complex problems (3 steps or more):\n"
    "Use this step-by-step format:\n\n"
    "## Step 1: [Concise description]\n[Brief explanation and calculations]\n\n"
    "## Step 2: [Concise description]\n[Brief explanation and calculations]\n\n"
    "...\n\n"
    "Regardless of the approach, always conclude with:\n\n"
    "Therefore, the final answer is: $\\boxed{answer}$. I hope it is correct.\n\n"
    "Where [answer] is just the final number or expression that solves the problem."
)

# SmolLM2-Instruct (ets models: smollm2-135m-instruct). Alone, the question rarely gets a
# final-answer line (greedy, 4 easy problems: 0/4 extracted), and the llama-instruct system prompt
# (long, LaTeX) is too much for a 135M model (3/4, 0 right, longer text). A short instruction after
# the question, naming the exact closing sentence, under the model's own default system prompt:
# 4/4 extracted (a system-prompt version of it: 3/4). Measured on SGLang CPU; see docs/demo.md.
SMOLLM2_INSTRUCTION = 'Solve it step by step. End your reply with "The answer is N." where N is the final number.'

DEFAULT_ANSWER_MARKERS: tuple[str, ...] = (
    "The answer is",
    "The final answer is:",
    "Therefore, the final answer is",
)

# (messages) -> formatted prompt text; the caller passes its tokenizer's apply_chat_template.
ChatTemplateFn = Callable[[list[dict[str, str]]], str]


@dataclass(frozen=True)
class PolicyModelType:
    """How a family of policy models writes steps and answers.

    ``stop`` are the stop strings that end one step; with ``no_stop_trim`` the engine keeps the
    delimiter in the returned text, so a child's prefix (parent ids + new ids) contains it and the
    next step starts where the model expects. ``step_tag`` is the delimiter as it appears at the
    end of a step's text (stripped to get the plain step text for the PRM and the embedder).
    """

    name: str
    stop: tuple[str, ...]
    step_tag: str
    no_stop_trim: bool
    answer_markers: tuple[str, ...]
    chat: bool
    system_prompt: str | None = None
    # Appended to the question on its own line in the user turn (chat models): small models follow
    # an instruction next to the question better than one in the system prompt.
    instruction: str | None = None

    def root_messages(self, question: str, system_prompt: str | None = None) -> list[dict[str, str]]:
        """Chat messages of the root (chat-style models only). A request's ``system_prompt``
        replaces the type's own (None keeps it, "" drops it); without any, the tokenizer's chat
        template adds the model's own default system turn, if it has one."""
        messages: list[dict[str, str]] = []
        system = self.system_prompt if system_prompt is None else system_prompt
        if system:
            messages.append({"role": "system", "content": system})
        content = f"{question}\n{self.instruction}" if self.instruction else question
        messages.append({"role": "user", "content": content})
        return messages

    def format_root(self, question: str, apply_chat_template: ChatTemplateFn | None = None) -> str:
        """The root prompt text: ``question + "\\n"`` for step models, the chat template otherwise.

        ``apply_chat_template`` must return the prompt with the generation prompt appended
        (e.g. ``lambda m: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)``).
        """
        if not self.chat:
            return question + "\n"
        if apply_chat_template is None:
            raise ConfigError("policy_model_type", f"{self.name!r} needs the tokenizer's chat template")
        return apply_chat_template(self.root_messages(question))

    def plain_step(self, text: str) -> str:
        """A step's text without its trailing delimiter and surrounding whitespace."""
        stripped = text.rstrip()
        tag = self.step_tag.strip()
        if tag and stripped.endswith(tag):
            stripped = stripped[: -len(tag)]
        return stripped.strip()

    def has_answer(self, step_text: str) -> bool:
        """Whether a step contains a final-answer marker (case-insensitive)."""
        low = step_text.lower()
        return any(m.lower() in low for m in self.answer_markers)


POLICY_MODEL_TYPES: dict[str, PolicyModelType] = {
    # Mistral / Llemma math-shepherd style: plain "question\n" root, steps end with " ки".
    "math-shepherd": PolicyModelType(
        name="math-shepherd",
        stop=("ки",),
        step_tag=" ки",
        no_stop_trim=True,
        answer_markers=DEFAULT_ANSWER_MARKERS,
        chat=False,
    ),
    # Llama-3.x-Instruct style: chat template with the search-and-learn system prompt, "\n\n" steps.
    "llama-instruct": PolicyModelType(
        name="llama-instruct",
        stop=("\n\n",),
        step_tag="\n\n",
        no_stop_trim=True,
        answer_markers=DEFAULT_ANSWER_MARKERS,
        chat=True,
        system_prompt=LLAMA_INSTRUCT_SYSTEM_PROMPT,
    ),
    # SmolLM2-Instruct: ChatML through the tokenizer's own template (its default system turn; end
    # token <|im_end|>, the model's eos), "\n\n" between steps like llama-instruct (the model
    # writes one paragraph per step), and a short answer-line instruction after the question.
    "smollm2-instruct": PolicyModelType(
        name="smollm2-instruct",
        stop=("\n\n",),
        step_tag="\n\n",
        no_stop_trim=True,
        answer_markers=DEFAULT_ANSWER_MARKERS,
        chat=True,
        instruction=SMOLLM2_INSTRUCTION,
    ),
}


def policy_model_type(name: str) -> PolicyModelType:
    """Look up a registered policy model type by name (ConfigError naming the field if unknown)."""
    try:
        return POLICY_MODEL_TYPES[name]
    except KeyError:
        raise ConfigError(
            "policy_model_type", f"unknown {name!r}; expected one of {sorted(POLICY_MODEL_TYPES)}"
        ) from None


# --------------------------------------------------------------------------------------------
# SearchConfig
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
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

    @property
    def model_type(self) -> PolicyModelType:
        return policy_model_type(self.policy_model_type)

    def resolved(self) -> "SearchConfig":
        """A copy with every "follow the default" field made explicit (for echoing back)."""
        return dataclasses.replace(
            self, lambda_s=self.effective_lambda_s, beam_keep=self.effective_beam_keep
        )

    # ---- overrides ----------------------------------------------------------------------------
    def replace(self, **overrides: Any) -> "SearchConfig":
        """A copy with ``overrides`` applied; ``None`` values mean "not set" and are ignored,
        so a request's unset optional fields keep the server defaults. Unknown names raise
        ConfigError. The result is not validated (call ``validate()``)."""
        names = {f.name for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in names:
                raise ConfigError(key, "unknown configuration field")
            if value is None or (isinstance(value, str) and value == "" and key in _STRING_FIELDS):
                continue
            changes[key] = value
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(
        cls, prefix: str = "ETS_SEARCH_", environ: Mapping[str, str] | None = None,
        base: "SearchConfig | None" = None,
    ) -> "SearchConfig":
        """Server-wide defaults from ``{prefix}{FIELD}`` variables (e.g. ETS_SEARCH_WIDTH=64).

        Empty values are ignored; an unparsable or invalid value raises ConfigError naming the
        variable (``ETS_SEARCH_WIDTH``).
        """
        overrides = settings.env_values(cls, environ, prefix=prefix, error=ConfigError, every_field=True)
        config = (base or cls()).replace(**overrides)
        try:
            config.validate()
        except ConfigError as err:
            raise ConfigError(prefix + err.field.upper(), err.message) from None
        return config

    # ---- validation ---------------------------------------------------------------------------
    def validate(self, max_width: int = MAX_WIDTH) -> "SearchConfig":
        """Raise ConfigError(field, message) for the first invalid field; return self if valid.

        ``max_width`` is the server's cap on ``width`` (a guard against runaway requests).
        ``method`` must name a registered selection method; the names live with the methods
        (``ets.search.selection.validate`` checks both)."""
        if not isinstance(self.method, str) or not self.method.strip():
            raise ConfigError("method", f"must name a selection method, got {self.method!r}")
        _int("width", self.width)
        if not 1 <= self.width <= max_width:
            raise ConfigError("width", f"must be between 1 and {max_width}, got {self.width}")
        # 0 is greedy decoding (valid for the engine, if pointless for a tree search).
        _nonneg("temperature", self.temperature)
        _int("max_step_tokens", self.max_step_tokens)
        _int("max_tokens", self.max_tokens)
        if self.max_step_tokens < 1:
            raise ConfigError("max_step_tokens", f"must be >= 1, got {self.max_step_tokens}")
        if not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise ConfigError("max_tokens", f"must be between 1 and {MAX_TOKENS_LIMIT}, got {self.max_tokens}")
        if self.max_step_tokens > self.max_tokens:
            raise ConfigError(
                "max_step_tokens",
                f"must not exceed max_tokens ({self.max_tokens}), got {self.max_step_tokens}",
            )
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
        _choice("policy_model_type", self.policy_model_type, tuple(POLICY_MODEL_TYPES))
        _choice("prm_type", self.prm_type, PRM_TYPES)
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
        return self


_STRING_FIELDS = frozenset({"method", "aggregation", "voting", "policy_model_type", "prm_type", "node_cost"})


def _choice(name: str, value: object, options: Sequence[str]) -> None:
    if value not in options:
        raise ConfigError(name, f"unknown {value!r}; expected one of {list(options)}")


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
