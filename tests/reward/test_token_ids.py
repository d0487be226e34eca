"""Which token ids the math-shepherd adapter reads, and the start-up check of the released model's
ids against the reference (issue 16, finding 5).

The reference reads "▁+" / "▁-" = 648 / 387 at the step tag "▁ки" = 12902 of
peiyi9979/math-shepherd-mistral-7b-prm (ETS rebase.py: logits_require_id=[648, 387, 12902]). The
tokenizers here are built with the `tokenizers` library: a sentencepiece-style vocabulary (the
"▁" word-start marker) holding those tokens at those ids, and the bare "+" at 489, as in the
real vocabulary. A conversion that does not prepend "▁" to the first word encodes a lone "+" as
489: the old lookup (bare text first) read that logit. And a sentencepiece tokenizer.model-only
folder (how the model ships) must load, which needs sentencepiece (finding 2).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ets.reward.adapters import AdapterError, make_adapter, known_token_ids
from ets.testing import tiny_models

REPO = "peiyi9979/math-shepherd-mistral-7b-prm"
WORDS = ("What", "is", "3", "5?", "Step", "1:", "add", "8", "The", "answer")


def spm_like_tokenizer(name_or_path: str, ids: dict[str, int], prepend: str = "never") -> Any:
    """``ets.testing.tiny_models.spm_like_tokenizer`` over this module's words, named ``name_or_path``."""
    return tiny_models.spm_like_tokenizer(WORDS, ids, prepend=prepend, name_or_path=name_or_path)


REFERENCE = {"\u2581+": 648, "\u2581-": 387, "\u2581ки": 12902}


@pytest.mark.parametrize("name", [REPO, "/models/hf/hub/models--peiyi9979--math-shepherd-mistral-7b-prm/snapshots/abc",
                                  "/models/math-shepherd-mistral-7b-prm"])
def test_released_model_reads_the_reference_ids(name: str) -> None:
    tok = spm_like_tokenizer(name, REFERENCE)
    # The conversion without a leading "▁": a lone "+" is the bare token, which the old lookup took.
    assert tok.encode("+", add_special_tokens=False) == [489]
    assert known_token_ids("math-shepherd", name) is not None
    adapter: Any = make_adapter("math-shepherd", tok)
    assert (adapter.plus_id, adapter.minus_id, adapter.tag_id) == (648, 387, 12902)
    # The tag positions are found in the formatted text ("... ки", after a space).
    enc = adapter.encode("What is 3 + 5?", ["Step 1: add", "The answer is 8"])
    assert [enc.input_ids[p] for p in enc.score_positions] == [12902, 12902]


def test_released_model_with_other_ids_fails_at_start_up() -> None:
    # A tokenizer file that is not the model's (its "▁+" elsewhere): scores would come from the
    # wrong logits, so the adapter refuses to start, naming the setting.
    tok = spm_like_tokenizer(REPO, {**REFERENCE, "\u2581+": 700})
    with pytest.raises(AdapterError) as err:
        make_adapter("math-shepherd", tok)
    assert err.value.field == "ETS_PRM_PLUS" and "648" in str(err.value) and "700" in str(err.value)
    tok = spm_like_tokenizer(REPO, {"\u2581+": 648, "\u2581-": 387, "\u2581ки": 9999})
    with pytest.raises(AdapterError) as err:
        make_adapter("math-shepherd", tok)
    assert err.value.field == "ETS_PRM_STEP_TAG"


def test_other_models_are_not_held_to_the_released_ids() -> None:
    tok = spm_like_tokenizer("/models/my-own-prm", {**REFERENCE, "\u2581+": 700})
    assert known_token_ids("math-shepherd", "/models/my-own-prm") is None
    adapter: Any = make_adapter("math-shepherd", tok)
    assert adapter.plus_id == 700  # still the spaced form, as math-shepherd was trained


def test_question_and_steps_are_joined_as_the_ets_reference_does() -> None:
    # rebase.py: s += question + "\n", then the policy's steps; each step ends with " ки".
    tok = spm_like_tokenizer(REPO, REFERENCE)
    adapter: Any = make_adapter("math-shepherd", tok)
    assert adapter.format("What is 3 + 5?", ["Step 1: add", "The answer is 8"]) == \
        "What is 3 + 5?\nStep 1: add ки\nThe answer is 8 ки"


def test_sentencepiece_model_only_folder_loads(tmp_path: Path) -> None:
    """math-shepherd ships tokenizer.model and no tokenizer.json: transformers converts it with
    sentencepiece (requirements/reward.txt), and the adapter reads the "▁" tokens of it."""
    import sentencepiece as spm  # type: ignore[import-untyped]
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Step {i}: {i} + {i} - {i} = {i} ки" for i in range(300)) + "\n")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=60,
                                   model_type="bpe", minloglevel=2)
    folder = tmp_path / "prm"
    folder.mkdir()
    (tmp_path / "tokenizer.model").rename(folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    tok: Any = AutoTokenizer.from_pretrained(folder)
    adapter: Any = make_adapter("math-shepherd", tok)
    ids = tok.convert_tokens_to_ids(["\u2581+", "\u2581-", "\u2581ки"])
    assert (adapter.plus_id, adapter.minus_id, adapter.tag_id) == tuple(ids)
    enc = adapter.encode("What is 1 + 1?", ["Step 1: 1 + 1 = 2", "Step 2: 2"])
    assert len(enc.score_positions) == 2
