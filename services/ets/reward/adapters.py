"""PRM adapters: how each process reward model type formats a trajectory and reads a step score.

Owns the per-type conventions of the algorithm's PRM scoring (each model's input format and how a
step score is read; the table in docs/reward-server.md), independent of the backend that runs the model:

- ``math-shepherd``: ``question + "\\n"`` then each step followed by `` ки`` (one line per step);
  the score of a step is P("+") of the softmax over the ["+", "-"] logits at its tag position.
  The tokens read are the ones after a space, as the model was trained ("▁+" / "▁-" / "▁ки"
  in its sentencepiece vocabulary); for the released model their ids are checked at start-up.
- ``rlhflow`` (RLHFlow Llama-3.1-8B PRM): chat format, one user turn per step (the first one
  prefixed by the question), each answered by an assistant "+"; the score is P("+") vs "-" at
  the assistant's answer position.
- ``llemma`` (Llemma PRM800K, REBASE's reward model): math-shepherd formatting; the score is
  sigmoid of the MEAN of the LM-head logits over the vocabulary at the tag position.
- ``qwen-prm`` (Qwen2.5-Math-PRM): chat format, the assistant turn is the steps joined and
  terminated by ``<extra_0>``; a 2-class head per separator, the score is P(class 1).
- ``judge``: any instruct model as a verifier (no PRM training). rlhflow's conversation shape
  with a verification prompt: the first user turn holds the question and the first step, each
  later one the next step, every turn ending with "Is the newest step correct? Answer Yes or
  No."; each is answered by an assistant "Yes". The score is P("Yes") vs "No" at the answer
  position. So the solution so far is the conversation before the newest turn, and a child's
  conversation extends its parent's: one forward pass scores every step, and an engine's
  prefix cache holds everything but the newest turn.
- ``arithmetic`` and ``grounded-arithmetic`` need no model and no tokens: ets.reward.rules and
  ets.reward.grounded check the equations in the text.

An adapter turns (question, steps) into token ids plus ``score_positions``: the positions p whose
model output (the logits that predict token p + 1) gives each step's score. Every token id comes
from the tokenizer and the adapter's options (tag, "+"/"-" strings), never from numbers here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

from ets import settings
from ets.reward.prm_types import PRM_TYPES
from ets.errors import FieldError

Readout = Literal["pair", "mean_logit", "class_head"]

QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."

# The judge's turns: {question} and {step} are filled in; the first turn carries the question.
JUDGE_FIRST_TURN = ("Question: {question}\n\nNewest step of the solution:\n{step}\n\n"
                    "Is the newest step correct? Answer Yes or No.")
JUDGE_NEXT_TURN = "Newest step of the solution:\n{step}\n\nIs the newest step correct? Answer Yes or No."


class AdapterError(FieldError):
    """A configuration or input problem; ``field`` names the offending setting or request field."""


def _option(default: str, env: str, help: str) -> Any:
    # Environment only (no flag), taken verbatim: whitespace can be part of a token or a template.
    return settings.setting(default, env=env, flag="", strip=False, help=help)


@dataclass(frozen=True)
class PrmOptions:
    """The strings an adapter looks up in the tokenizer (overridable per deployment)."""

    step_tag: str = _option("ки", "ETS_PRM_STEP_TAG", "step tag token (math-shepherd, llemma)")
    plus: str = _option("+", "ETS_PRM_PLUS", "good-step token (math-shepherd, rlhflow)")
    minus: str = _option("-", "ETS_PRM_MINUS", "bad-step token (math-shepherd, rlhflow)")
    separator: str = _option("<extra_0>", "ETS_PRM_SEPARATOR", "step separator token (qwen-prm)")
    system_prompt: str = QWEN_PRM_SYSTEM
    # judge: the answer words it reads and its two turn templates ({question}, {step}).
    yes: str = _option("Yes", "ETS_PRM_YES", "the judge's yes word")
    no: str = _option("No", "ETS_PRM_NO", "the judge's no word")
    judge_first_turn: str = _option(JUDGE_FIRST_TURN, "ETS_PRM_JUDGE_FIRST_TURN",
                                    "the judge's first turn; must contain {question} and {step}")
    judge_next_turn: str = _option(JUDGE_NEXT_TURN, "ETS_PRM_JUDGE_NEXT_TURN",
                                   "the judge's later turns; must contain {step}")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "PrmOptions":
        """The options from their ``ETS_PRM_*`` variables (the one loader, ``ets.settings``)."""
        return settings.from_env(cls, env, error=AdapterError).validate()

    def validate(self) -> "PrmOptions":
        """Refuse judge templates that would drop the text they exist to show."""
        for setting, template, names in (("ETS_PRM_JUDGE_FIRST_TURN", self.judge_first_turn, ("question", "step")),
                                         ("ETS_PRM_JUDGE_NEXT_TURN", self.judge_next_turn, ("step",))):
            for name in names:
                if "{" + name + "}" not in template:
                    raise AdapterError(setting, f"must contain {{{name}}}")
            try:
                template.format(question="", step="")
            except (KeyError, IndexError, ValueError) as exc:
                raise AdapterError(setting, f"only {{question}} and {{step}} may be filled in ({exc!r}); "
                                   "write literal braces as {{ and }}") from None
        return self


@dataclass(frozen=True)
class EncodedTrajectory:
    """Token ids of one formatted trajectory and the position whose output scores each step.
    Rule-based types (no tokenizer) carry the plain step texts in ``steps`` instead of ids."""

    input_ids: tuple[int, ...]
    score_positions: tuple[int, ...] = field(default_factory=tuple)
    steps: tuple[str, ...] = field(default_factory=tuple)
    question: str = ""  # rule-based types that read the problem (grounded-arithmetic)

    def last_step_prompt(self) -> tuple[int, ...]:
        """The ids up to and including the newest step's score position: the next-token output
        of this prompt is the newest step's score (what an engine returns for a prompt's end)."""
        return self.input_ids[: self.score_positions[-1] + 1]


# The ids the reference code reads for models whose vocabulary it names (ETS rebase.py:
# logits_require_id=[648, 387, 12902]; the model card: encode("+ -")[1:] == [648, 387]). A
# tokenizer that resolves other ids (e.g. a conversion without sentencepiece's leading "▁"
# maps "+" to 489) would read scores from the wrong logits with no error: refused at start-up.
KNOWN_TOKEN_IDS: dict[str, dict[str, dict[str, int]]] = {
    "math-shepherd": {
        "math-shepherd-mistral-7b-prm": {"ETS_PRM_PLUS": 648, "ETS_PRM_MINUS": 387, "ETS_PRM_STEP_TAG": 12902},
    },
}
SENTENCEPIECE_SPACE = "\u2581"  # "▁": sentencepiece's word-start marker


def known_token_ids(prm_type: str, model: str) -> dict[str, int] | None:
    """The reference's token ids for ``model`` (a hub id, a local folder or a hub cache path
    naming it), or None for a model the reference does not name."""
    name = model.replace("--", "/").rstrip("/")
    for known, ids in KNOWN_TOKEN_IDS.get(prm_type, {}).items():
        if known in name.split("/") or name.endswith(known) or f"/{known}/" in name:
            return ids
    return None


def spaced_token_id(tokenizer: Any, text: str, setting: str) -> int:
    """The id of ``text`` as a word after a space: sentencepiece's "▁" + text where the
    vocabulary holds it (how math-shepherd's labels were tokenized), else ``single_token_id``."""
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    if convert is not None:
        spaced = convert(SENTENCEPIECE_SPACE + text)
        if isinstance(spaced, int) and spaced != getattr(tokenizer, "unk_token_id", None):
            return spaced
    return single_token_id(tokenizer, text, setting)


def single_token_id(tokenizer: Any, text: str, setting: str) -> int:
    """The id of ``text`` when the tokenizer holds it as exactly one token, else AdapterError."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) == 1:
        return int(ids[0])
    # Sentencepiece vocabularies hold "+" as "▁+" and only produce it after a space.
    ids = tokenizer.encode(f" {text}", add_special_tokens=False)
    if len(ids) == 1:
        return int(ids[0])
    raise AdapterError(setting, f"{text!r} is not a single token for this tokenizer (got {len(ids)} ids)")


def _clean_step(step: str, tag: str | None) -> str:
    """A step's plain text: the policy may hand steps over with the tag or trailing space still
    attached; a tag inside a step would add a score position the caller did not ask for."""
    text = step.strip()
    if tag:
        text = text.replace(tag, "").strip()
    return text


class PrmAdapter:
    """Formatting and readout of one PRM type over a tokenizer."""

    name: str = ""
    readout: Readout = "pair"

    def __init__(self, tokenizer: Any, options: PrmOptions | None = None) -> None:
        self.tokenizer = tokenizer
        self.options = options or PrmOptions()
        self.plus_id: int | None = None
        self.minus_id: int | None = None

    def encode(self, question: str, steps: Sequence[str]) -> EncodedTrajectory:
        raise NotImplementedError

    def _pair_ids(self, plus: tuple[str, str] | None = None, minus: tuple[str, str] | None = None) -> None:
        """The two answer ids read as a pair: (text, setting) each, "+"/"-" unless given."""
        plus = plus or (self.options.plus, "ETS_PRM_PLUS")
        minus = minus or (self.options.minus, "ETS_PRM_MINUS")
        self.plus_id = single_token_id(self.tokenizer, *plus)
        self.minus_id = single_token_id(self.tokenizer, *minus)
        if self.plus_id == self.minus_id:
            raise AdapterError(plus[1], f"{plus[0]!r} and {minus[0]!r} map to the same token")


class _TaggedAdapter(PrmAdapter):
    """Shared by math-shepherd and llemma: plain text, each step ends with the step tag."""

    # Between the question and the first step. The ETS reference (rebase.py) writes
    # `question + "\n"` and lets the policy continue: the PRM scores that very text, so "\n" is
    # what the paper's numbers were measured with. (math-shepherd's model card and training
    # data join question and solution with a space; the tag positions, hence the readout, are
    # the same either way.)
    question_separator = "\n"

    def __init__(self, tokenizer: Any, options: PrmOptions | None = None) -> None:
        super().__init__(tokenizer, options)
        self.tag_id = single_token_id(tokenizer, self.options.step_tag, "ETS_PRM_STEP_TAG")

    def format(self, question: str, steps: Sequence[str]) -> str:
        tag = self.options.step_tag
        body = "\n".join(f"{_clean_step(s, tag)} {tag}" for s in steps)
        return f"{_clean_step(question, tag)}{self.question_separator}{body}"

    def encode(self, question: str, steps: Sequence[str]) -> EncodedTrajectory:
        ids = tuple(int(i) for i in self.tokenizer.encode(self.format(question, steps)))
        positions = tuple(i for i, t in enumerate(ids) if t == self.tag_id)
        if len(positions) != len(steps):
            raise AdapterError(
                "steps", f"expected {len(steps)} step tags after tokenization, found {len(positions)}"
            )
        return EncodedTrajectory(ids, positions)


class MathShepherdAdapter(_TaggedAdapter):
    name = "math-shepherd"
    readout = "pair"

    def __init__(self, tokenizer: Any, options: PrmOptions | None = None) -> None:
        super().__init__(tokenizer, options)
        # The tag follows a space in the text (format above) and the training labels replaced
        # it: tag and "+"/"-" are read as tokenized after a space ("▁+" 648, not "+" 489).
        self.tag_id = spaced_token_id(tokenizer, self.options.step_tag, "ETS_PRM_STEP_TAG")
        self.plus_id = spaced_token_id(tokenizer, self.options.plus, "ETS_PRM_PLUS")
        self.minus_id = spaced_token_id(tokenizer, self.options.minus, "ETS_PRM_MINUS")
        if self.plus_id == self.minus_id:
            raise AdapterError("ETS_PRM_PLUS",
                               f"{self.options.plus!r} and {self.options.minus!r} map to the same token")
        model = str(getattr(tokenizer, "name_or_path", "") or "")
        expected = known_token_ids(self.name, model)
        if expected is not None:
            got = {"ETS_PRM_PLUS": self.plus_id, "ETS_PRM_MINUS": self.minus_id, "ETS_PRM_STEP_TAG": self.tag_id}
            wrong = {k: v for k, v in got.items() if v != expected[k]}
            if wrong:
                setting = next(iter(wrong))
                raise AdapterError(setting, f"{model}: the tokenizer resolves {wrong}, the model reads "
                                   f"{ {k: expected[k] for k in wrong} } (reference ids); scores would come "
                                   "from the wrong logits. Check the tokenizer files (sentencepiece "
                                   "tokenizer.model) and ETS_PRM_PLUS/ETS_PRM_MINUS/ETS_PRM_STEP_TAG")


class LlemmaAdapter(_TaggedAdapter):
    name = "llemma"
    readout = "mean_logit"


class _ChatAdapter(PrmAdapter):
    def _render_ids(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise AdapterError("ETS_PRM_MODEL", f"{self.name} needs a tokenizer with a chat template")
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        # The template writes its own BOS where the model expects one.
        return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)]


class _TurnAdapter(_ChatAdapter):
    """One user turn per step, each answered by the positive answer token; the step's score is
    read where that answer goes (shared by rlhflow and judge)."""

    readout = "pair"

    def _user_turn(self, question: str, step: str, k: int) -> str:
        raise NotImplementedError

    def _answer_text(self) -> str:
        raise NotImplementedError

    def encode(self, question: str, steps: Sequence[str]) -> EncodedTrajectory:
        messages: list[dict[str, str]] = []
        positions: list[int] = []
        prefixes: list[list[int]] = []
        for k, step in enumerate(steps):
            messages.append({"role": "user", "content": self._user_turn(question.strip(), _clean_step(step, None), k)})
            # The answer position of step k is where the generation prompt after its user turn ends.
            prompt = self._render_ids(messages, add_generation_prompt=True)
            positions.append(len(prompt) - 1)
            prefixes.append(prompt)
            messages.append({"role": "assistant", "content": self._answer_text()})
        full = self._render_ids(messages, add_generation_prompt=False)
        for prompt in prefixes:
            # Scores are read inside one forward pass over the whole conversation, so each step's
            # prompt must tokenize as a prefix of it (true at special-token turn boundaries).
            if full[: len(prompt)] != prompt or full[len(prompt)] != self.plus_id:
                raise AdapterError(
                    "ETS_PRM_MODEL",
                    f"chat template does not tokenize prefix-stably with the answer token for {self.name}",
                )
        return EncodedTrajectory(tuple(full), tuple(positions))


class RlhflowAdapter(_TurnAdapter):
    """User turn per step (the first prefixed by the question), assistant answers "+"."""

    name = "rlhflow"

    def __init__(self, tokenizer: Any, options: PrmOptions | None = None) -> None:
        super().__init__(tokenizer, options)
        self._pair_ids()

    def _user_turn(self, question: str, step: str, k: int) -> str:
        return f"{question} {step}" if k == 0 else step

    def _answer_text(self) -> str:
        return self.options.plus


class JudgeAdapter(_TurnAdapter):
    """Any instruct model asked "Is the newest step correct?" per step; P("Yes") vs "No"."""

    name = "judge"

    def __init__(self, tokenizer: Any, options: PrmOptions | None = None) -> None:
        super().__init__(tokenizer, options)
        self.options.validate()
        self._pair_ids((self.options.yes, "ETS_PRM_YES"), (self.options.no, "ETS_PRM_NO"))

    def _user_turn(self, question: str, step: str, k: int) -> str:
        template = self.options.judge_first_turn if k == 0 else self.options.judge_next_turn
        return template.format(question=question, step=step)

    def _answer_text(self) -> str:
        # The earlier turns' answers are fixed (whatever the model said there) so that a child's
        # conversation extends its parent's; "Yes" is what a correct prefix would have earned.
        return self.options.yes


class QwenPrmAdapter(_ChatAdapter):
    """System + user question, assistant = steps each ended by the separator; 2-class head."""

    name = "qwen-prm"
    readout = "class_head"

    def __init__(self, tokenizer: Any, options: PrmOptions | None = None) -> None:
        super().__init__(tokenizer, options)
        self.separator_id = single_token_id(tokenizer, self.options.separator, "ETS_PRM_SEPARATOR")

    def encode(self, question: str, steps: Sequence[str]) -> EncodedTrajectory:
        sep = self.options.separator
        answer = "".join(f"{_clean_step(s, sep)}{sep}" for s in steps)
        messages = [
            {"role": "system", "content": self.options.system_prompt},
            {"role": "user", "content": question.strip()},
            {"role": "assistant", "content": answer},
        ]
        ids = tuple(self._render_ids(messages, add_generation_prompt=False))
        positions = tuple(i for i, t in enumerate(ids) if t == self.separator_id)
        if len(positions) != len(steps):
            raise AdapterError("steps", f"expected {len(steps)} separators after tokenization, found {len(positions)}")
        return EncodedTrajectory(ids, positions)


# The model-scored PRM types (every type in PRM_TYPES except the rule-based ones).
ADAPTERS: dict[str, type[PrmAdapter]] = {
    "math-shepherd": MathShepherdAdapter,
    "rlhflow": RlhflowAdapter,
    "llemma": LlemmaAdapter,
    "qwen-prm": QwenPrmAdapter,
    "judge": JudgeAdapter,
}


def make_adapter(prm_type: str, tokenizer: Any, options: PrmOptions | None = None,
                 setting: str = "ETS_PRM_TYPE") -> PrmAdapter:
    """The adapter for model-scored ``prm_type``; unknown types raise AdapterError naming ``setting``,
    rule-based ones (no model, no tokenizer) name ``ETS_PRM_BACKEND``."""
    if prm_type not in PRM_TYPES:
        raise AdapterError(setting, f"unknown PRM type {prm_type!r}; choose from {list(PRM_TYPES)}")
    if prm_type not in ADAPTERS:
        raise AdapterError("ETS_PRM_BACKEND", f"PRM type {prm_type!r} is scored by rules, without a model: "
                           "use ETS_PRM_BACKEND=rules")
    return ADAPTERS[prm_type](tokenizer, options)
