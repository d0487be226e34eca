"""SearchConfig: paper defaults, validation naming the field, overrides, environment, model types."""
from __future__ import annotations

import dataclasses
import re

import pytest

from ets.api.v1 import search_pb2
from ets.config import search_defaults_from_env
from ets.reward.prm_types import PRM_TYPES
from ets.search.config import MAX_WIDTH, ConfigError, SearchConfig, preset_lambda_s
from ets.errors import SettingError
from ets.policy.model_types import POLICY_MODEL_TYPES, policy_model_type
from ets.config import validate


def test_defaults_are_the_papers() -> None:
    c = SearchConfig().validate()
    assert (c.method, c.width, c.temperature, c.max_step_tokens, c.max_tokens, c.max_depth) == (
        "ets", 16, 1.0, 256, 1024, 25)
    assert (c.softmax_temperature, c.lambda_c, c.cluster_distance) == (0.2, 1.0, 0.3)
    assert (c.aggregation, c.voting, c.node_cost, c.policy_model_type) == (
        "last", "weighted_majority", "uniform", "math-shepherd")
    assert c.effective_beam_keep == 4


def test_field_names_equal_the_proto_fields() -> None:
    proto = set(search_pb2.SearchConfig.DESCRIPTOR.fields_by_name)
    assert {f.name for f in dataclasses.fields(SearchConfig)} == proto


@pytest.mark.parametrize("width,lam", [(16, 1.5), (64, 1.4), (256, 1.45), (8, 1.5), (100, 1.4), (1024, 1.45)])
def test_lambda_s_follows_the_width_preset(width: int, lam: float) -> None:
    c = SearchConfig(width=width)
    assert c.lambda_s is None and c.effective_lambda_s == lam == preset_lambda_s(width)
    assert c.resolved().lambda_s == lam
    # An explicit value wins, including 0 (coverage off).
    assert SearchConfig(width=width, lambda_s=0.0).effective_lambda_s == 0.0


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"width": 0}, "width"),
        ({"width": 5000}, "width"),
        ({"width": 2.5}, "width"),
        ({"lambda_c": -1.0}, "lambda_c"),
        ({"lambda_s": -0.1}, "lambda_s"),
        ({"method": "mcts"}, "method"),  # checked against the method registry
        ({"aggregation": "median"}, "aggregation"),
        ({"voting": "plurality"}, "voting"),
        ({"node_cost": "flops"}, "node_cost"),
        ({"softmax_temperature": 0.0}, "softmax_temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"max_step_tokens": 2048}, "max_step_tokens"),
        ({"max_step_tokens": 0}, "max_step_tokens"),
        ({"max_depth": 0}, "max_depth"),
        ({"cluster_distance": 3.0}, "cluster_distance"),
        ({"policy_model_type": "gpt"}, "policy_model_type"),
        ({"prm_type": "orm"}, "prm_type"),
        ({"solver_time_limit_s": 0.0}, "solver_time_limit_s"),
        ({"beam_keep": 0}, "beam_keep"),
        ({"beam_keep": 17}, "beam_keep"),
        ({"seed": -3}, "seed"),
    ],
)
def test_invalid_values_name_their_field(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(SearchConfig().replace(**overrides))
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


def test_width_is_capped() -> None:
    SearchConfig(width=MAX_WIDTH).validate()
    with pytest.raises(ConfigError, match="width"):
        SearchConfig(width=MAX_WIDTH + 1).validate()


def test_replace_ignores_unset_and_rejects_unknown() -> None:
    base = SearchConfig(width=64)
    c = base.replace(width=None, method="", lambda_c=5.0, seed=7)
    assert (c.width, c.method, c.lambda_c, c.seed) == (64, "ets", 5.0, 7)
    assert base.lambda_c == 1.0  # frozen original untouched
    with pytest.raises(ConfigError) as info:
        base.replace(widht=3)
    assert info.value.field == "widht"


def test_from_env() -> None:
    env = {"ETS_SEARCH_WIDTH": "256", "ETS_SEARCH_METHOD": "rebase", "ETS_SEARCH_LAMBDA_C": "5",
           "ETS_SEARCH_SEED": "", "OTHER": "x"}
    c = search_defaults_from_env(environ=env)
    assert (c.width, c.method, c.lambda_c, c.seed, c.effective_lambda_s) == (256, "rebase", 5.0, None, 1.45)
    with pytest.raises(SettingError) as info:
        search_defaults_from_env(environ={"ETS_SEARCH_WIDTH": "wide"})
    assert info.value.field == "ETS_SEARCH_WIDTH"  # errors name the variable to fix
    with pytest.raises(SettingError) as info:
        search_defaults_from_env(environ={"X_MAX_TOKENS": "10"}, prefix="X_")
    assert info.value.field == "X_MAX_STEP_TOKENS"  # 256 > 10


def test_model_types() -> None:
    ms = policy_model_type("math-shepherd")
    assert ms.format_root("What is 1+1?") == "What is 1+1?\n"
    assert ms.stop == ("ки",) and ms.no_stop_trim
    assert ms.plain_step("Add 1 and 1 to get 2. ки") == "Add 1 and 1 to get 2."
    assert ms.has_answer("So the answer is: 2 ки") and not ms.has_answer("Add 1 and 1. ки")
    li = POLICY_MODEL_TYPES["llama-instruct"]
    assert li.stop == ("\n\n",) and li.chat
    assert li.has_answer("Therefore, the final answer is: $\\boxed{2}$. I hope it is correct.")
    rendered = li.format_root("Q?", lambda msgs: "|".join(f"{m['role']}:{m['content']}" for m in msgs))
    assert rendered.startswith("system:Solve the following math problem") and rendered.endswith("|user:Q?")
    with pytest.raises(ConfigError) as info:
        li.format_root("Q?")
    assert info.value.field == "policy_model_type"
    # SmolLM2: no system turn of ours (the template adds the model's own), the answer-line
    # instruction after the question, "\n\n" steps.
    sm = POLICY_MODEL_TYPES["smollm2-instruct"]
    assert sm.stop == ("\n\n",) and sm.chat and sm.system_prompt is None
    assert sm.instruction is not None
    messages = sm.root_messages("Tom has 3 {apples}?")
    assert messages == [{"role": "user", "content": "Tom has 3 {apples}?\n" + sm.instruction}]
    # No placeholder letter for the model to copy (bench/instruction.py measured it copied).
    assert '"The answer is" followed by the final number' in sm.instruction
    assert re.search(r"\b[A-Z]\b", sm.instruction) is None
    assert sm.has_answer("So he has 8 apples.\nThe answer is 8.")
    with pytest.raises(ConfigError):
        policy_model_type("nope")
    assert PRM_TYPES == ("math-shepherd", "rlhflow", "llemma", "qwen-prm", "judge", "arithmetic",
                         "grounded-arithmetic")
    # One list: the reward server validates against the same object.
    from ets.reward import adapters, server

    assert adapters.PRM_TYPES is PRM_TYPES and server.PRM_TYPES is PRM_TYPES
