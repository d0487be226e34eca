"""Policy client wire format without a server: sampling-parameter JSON (SGLang rejects unknown
keys), finish-reason parsing as observed from SGLang 0.5.23, error-body parsing."""
from __future__ import annotations

import pytest

from ets.policy.client import (
    PolicyRequestError,
    PolicyServerError,
    SamplingParams,
    _error_message,
    parse_sample,
)

# The sampling keys SGLang 0.5.23's /generate accepts (its 400 message for an unknown key).
SGLANG_KEYS = {
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
    "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "stream_interval", "logit_bias", "sampling_seed", "custom_params", "beam_width",
    "watermark", "choice",
}


def test_sampling_params_json_uses_only_sglang_keys() -> None:
    full = SamplingParams(max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=5, stop=("ки",), stop_token_ids=(3,),
                          no_stop_trim=True, seed=11, regex="a+", ignore_eos=True, skip_special_tokens=False,
                          logit_bias={7: 2.5})
    body = full.to_json(n=4)
    assert set(body) <= SGLANG_KEYS
    assert body["n"] == 4 and body["sampling_seed"] == 11 and body["stop"] == ["ки"]
    assert body["logit_bias"] == {"7": 2.5}
    assert SamplingParams(max_new_tokens=1).to_json() == {"max_new_tokens": 1, "temperature": 1.0}


@pytest.mark.parametrize(
    "params, field",
    [
        (SamplingParams(max_new_tokens=-1), "max_new_tokens"),
        (SamplingParams(max_new_tokens=1, temperature=-0.1), "temperature"),
        (SamplingParams(max_new_tokens=1, top_p=0.0), "top_p"),
        (SamplingParams(max_new_tokens=1, regex="a", json_schema="{}"), "regex/json_schema"),
        (SamplingParams(max_new_tokens=1, stop=("",)), "stop"),
    ],
)
def test_invalid_sampling_params_name_the_field(params: SamplingParams, field: str) -> None:
    with pytest.raises(PolicyRequestError) as err:
        params.validate()
    assert err.value.message.startswith(field)


def _result(reason: dict, ids: tuple[int, ...] = (5, 6)) -> dict:
    return {"text": "x", "output_ids": list(ids),
            "meta_info": {"finish_reason": reason, "prompt_tokens": 10, "completion_tokens": len(ids),
                          "cached_tokens": 9, "e2e_latency": 0.1}}


def test_finish_reasons_as_sglang_reports_them() -> None:
    assert parse_sample(_result({"type": "stop", "matched": "ки"})).finish == "stop"
    eos = parse_sample(_result({"type": "stop", "matched": 1}))
    assert eos.finish == "eos" and eos.matched == 1
    assert parse_sample(_result({"type": "stop", "matched": 512}), stop_token_ids=(512,)).finish == "stop"
    length = parse_sample(_result({"type": "length", "length": 2}))
    assert (length.finish, length.prompt_tokens, length.cached_tokens, length.output_ids) == ("length", 10, 9, (5, 6))
    with pytest.raises(PolicyRequestError, match="context length"):
        parse_sample(_result({"type": "abort", "message": "exceeds context length", "status_code": 400}))
    with pytest.raises(PolicyServerError):
        parse_sample({"text": "no meta"})
    with pytest.raises(PolicyServerError):
        parse_sample(_result({"type": "weird"}))


def test_error_bodies() -> None:
    assert _error_message('{"error": "unknown field `bogus`"}') == "unknown field `bogus`"
    assert _error_message('{"error": {"message": "Failed to compile regex"}}') == "Failed to compile regex"
    assert _error_message('{"detail": [{"msg": "bad"}]}') == "[{'msg': 'bad'}]"
    assert _error_message("plain text") == "plain text"
