"""Policy model types: how a family of policy models writes steps and answers.

Owns the ``PolicyModelType`` registry (``POLICY_MODEL_TYPES``, looked up by
``policy_model_type``): the step delimiter the engine stops at and whether it keeps it, the
final-answer markers, and the root (plain ``question\n`` or the chat template's messages with
the type's system prompt and instruction). The search config names a type
(``SearchConfig.policy_model_type``, validated against this registry), the step generator stops
and trims by it, the search loop and the reward side strip steps and find answers with it. Pure:
no I/O; the chat template itself is the caller's (the policy server's tokenizer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ets.errors import ConfigError

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
# No placeholder letter to copy: 'End your reply with "The answer is N." where N is ...' had the
# model answer a literal "N" in 5% of sampled solutions; this wording gives a usable (numeric)
# answer in 82% against 71% (paired, 24 problems x 8 samples; bench/instruction.py).
SMOLLM2_INSTRUCTION = ('Solve it step by step. End your reply with the sentence "The answer is" '
                       'followed by the final number.')

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


def _paragraph_chat(name: str, *, system_prompt: str | None = None,
                    instruction: str | None = None) -> PolicyModelType:
    """An instruct model behind its chat template that writes one paragraph per step: the blank
    line ends a step and is kept, so a child's prefix continues where the model expects."""
    return PolicyModelType(name=name, stop=("\n\n",), step_tag="\n\n", no_stop_trim=True,
                           answer_markers=DEFAULT_ANSWER_MARKERS, chat=True, system_prompt=system_prompt,
                           instruction=instruction)


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
    "llama-instruct": _paragraph_chat("llama-instruct", system_prompt=LLAMA_INSTRUCT_SYSTEM_PROMPT),
    # SmolLM2-Instruct: ChatML through the tokenizer's own template (its default system turn; end
    # token <|im_end|>, the model's eos), "\n\n" between steps like llama-instruct (the model
    # writes one paragraph per step), and a short answer-line instruction after the question.
    "smollm2-instruct": _paragraph_chat("smollm2-instruct", instruction=SMOLLM2_INSTRUCTION),
}


def policy_model_type(name: str) -> PolicyModelType:
    """Look up a registered policy model type by name (ConfigError naming the field if unknown)."""
    try:
        return POLICY_MODEL_TYPES[name]
    except KeyError:
        raise ConfigError(
            "policy_model_type", f"unknown {name!r}; expected one of {sorted(POLICY_MODEL_TYPES)}"
        ) from None
