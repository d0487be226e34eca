"""Tiny random-weight models with trained tokenizers, written with ``save_pretrained``.

No model hub is reachable on CPU CI machines, so the tests, the README's main job and the CPU
deployment profile build their models here: a byte-level BPE tokenizer trained on generated
math-like text, and a random-weight causal LM (Llama or Qwen2 architecture). The real
``from_pretrained`` path and SGLang's model loader are exercised; the generated text is noise.

Each PRM type gets the tokens its adapter reads (step tags, "+"/"-", ``<extra_0>``) as single
tokens, so adapters look ids up from the tokenizer exactly as they do for real models.

    python -m ets.testing.tiny_models OUT_DIR [--kind policy|math-shepherd|rlhflow|llemma|qwen-prm]
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

# Tokens each model kind needs as single tokens, and whether they are "special" (skipped when
# decoding) or ordinary added tokens that appear in text.
@dataclass(frozen=True)
class TinyModelKind:
    arch: str = "llama"  # llama | qwen2
    added_tokens: tuple[str, ...] = ()
    special_tokens: tuple[str, ...] = ()
    chat_template: str | None = None
    # PRM readout the weights are shaped for (see _shape_prm_weights): "" (plain LM), "pair"
    # (P(+) vs P(-) at a position), "mean_logit" (sigmoid of the mean LM-head logit), "class_head"
    # (a 2-class token-classification head, Qwen2.5-Math-PRM style).
    prm_readout: str = ""
    # Weights dtype. The PRM kinds are float32 so that the reward server's two backends (SGLang
    # and transformers, different kernels) agree to ~1e-3 rather than to bf16 rounding noise.
    dtype: str = "bfloat16"


_PLAIN_CHAT = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
# RLHFlow's PRM reads "+"/"-" as the assistant's whole answer after each user step.
_RLHFLOW_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

KINDS: dict[str, TinyModelKind] = {
    "policy": TinyModelKind(added_tokens=("ки",), chat_template=_PLAIN_CHAT),
    "math-shepherd": TinyModelKind(added_tokens=("ки",), chat_template=_PLAIN_CHAT, prm_readout="pair",
                                   dtype="float32"),
    "rlhflow": TinyModelKind(
        special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), chat_template=_RLHFLOW_CHAT,
        prm_readout="pair", dtype="float32",
    ),
    "llemma": TinyModelKind(added_tokens=("ки",), chat_template=_PLAIN_CHAT, prm_readout="mean_logit", dtype="float32"),
    "qwen-prm": TinyModelKind(
        arch="qwen2", special_tokens=("<extra_0>",), chat_template=_PLAIN_CHAT, prm_readout="class_head",
        dtype="float32",
    ),
    "policy-qwen2": TinyModelKind(arch="qwen2", added_tokens=("ки",), chat_template=_PLAIN_CHAT),
}

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
# transformers maps every qwen2 checkpoint to Qwen2Tokenizer, which adds "<|endoftext|>" as its
# unk token; unless the trained vocab already holds it, it lands at id == vocab_size (outside the
# embedding) and every unknown lookup returns that id. Real Qwen vocabularies contain it.
QWEN_ENDOFTEXT = "<|endoftext|>"
# Init scale for the PRM kinds: at the default 0.02 the residual stream is dominated by the token
# embedding, so every step tag scores the same; a larger scale makes scores depend on context
# and spread over (0, 1), which is what lets the backend-agreement tests mean something.
PRM_INIT_STD = 0.25
_WORDS = (
    "step solve the answer is let us compute first then so therefore sum of numbers plus minus times "
    "equals problem question math reasoning value total each we get final result box check verify because"
).split()


def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(400):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 15)))
        a, b = rng.randint(0, 999), rng.randint(0, 99)
        lines.append(f"Step {i % 9 + 1}: {words} {a} + {b} = {a + b}. The answer is {a + b}.")
    return lines


def make_tiny_model(out: str | Path, kind: str = "policy", *, seed: int = 0, hidden_size: int = 64,
                    num_layers: int = 2, vocab_size: int = 512) -> Path:
    """Write a tiny model of ``kind`` to ``out`` and return the folder. Idempotent per folder."""
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    if kind not in KINDS:
        raise ValueError(f"kind: unknown tiny model kind {kind!r}; choose from {sorted(KINDS)}")
    spec = KINDS[kind]
    out = Path(out)
    marker = out / "tiny_model.json"
    if marker.exists() and json.loads(marker.read_text()).get("kind") == kind:
        return out
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD] + ([QWEN_ENDOFTEXT] if spec.arch == "qwen2" else []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer)
    if spec.added_tokens:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in spec.added_tokens])
    if spec.special_tokens:
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in spec.special_tokens])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    if spec.special_tokens:
        hf_tok.add_special_tokens({"additional_special_tokens": list(spec.special_tokens)})
    hf_tok.chat_template = spec.chat_template
    hf_tok.model_max_length = 4096
    hf_tok.save_pretrained(out)

    vocab = len(hf_tok)
    common = dict(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=4096, bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id, tie_word_embeddings=False, torch_dtype=spec.dtype,
    )
    if spec.prm_readout:
        common["initializer_range"] = PRM_INIT_STD
    config = AutoConfig.for_model(spec.arch, **common)
    torch.manual_seed(seed)
    if spec.prm_readout == "class_head":
        # Stand-in for Qwen2ForProcessRewardModel (trust_remote_code upstream): a Qwen2 backbone
        # with a per-token 2-class head, loadable with AutoModelForTokenClassification.
        from transformers import AutoModelForTokenClassification

        config.num_labels = 2
        model = AutoModelForTokenClassification.from_config(config).to(getattr(torch, spec.dtype))
    else:
        model = AutoModelForCausalLM.from_config(config).to(getattr(torch, spec.dtype))
    if spec.prm_readout == "mean_logit":
        _add_scalar_head(model, seed)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.bos_token_id = hf_tok.bos_token_id
        model.generation_config.eos_token_id = hf_tok.eos_token_id
    model.save_pretrained(out)
    marker.write_text(json.dumps({"kind": kind, "arch": spec.arch, "seed": seed, "vocab_size": vocab}))
    return out


def _add_scalar_head(model: Any, seed: int) -> None:  # a transformers PreTrainedModel
    """Give the LM head a common row component, as a PRM800K-style model's head has.

    Llemma PRM800K scores a step with sigmoid(mean over the vocabulary of the LM-head logits); with
    independent random rows that mean is ~0 and every score is 0.5. Adding one shared vector to
    every row makes the mean logit a real scalar head whose value depends on the hidden state.
    """
    import torch

    head = model.get_output_embeddings().weight
    gen = torch.Generator().manual_seed(seed + 1)
    shared = torch.randn(head.shape[1], generator=gen) * 0.5
    with torch.no_grad():
        head.add_(shared.to(head.dtype))


def spm_like_tokenizer(words: Iterable[str], ids: dict[str, int], *, prepend: str = "never",
                       name_or_path: str = "", pad_token: str | None = None) -> Any:
    """A fast tokenizer with a sentencepiece-style vocabulary (math-shepherd's layout): words split at
    spaces and newlines, the "\u2581" marker on every word after a space (and on the first one too
    with ``prepend="first"``), bare "+" / "-" / "ки" at fixed ids, and ``ids`` pinned on top (e.g. the
    released model's "\u2581+" / "\u2581-" / "\u2581ки"). Each word and its marked form get ids from 100."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581": 3, "\n": 13, "+": 489, "-": 12, "\u043a\u0438": 1300}
    next_id = 100
    for word in words:
        for form in (word, "\u2581" + word):
            if form not in vocab and form not in ids:
                vocab[form] = next_id
                next_id += 1
    vocab.update(ids)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend, split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=prepend)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   **({"pad_token": pad_token} if pad_token else {}))
    if name_or_path:
        fast.name_or_path = name_or_path
    return fast


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--kind", default="policy", choices=sorted(KINDS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_tiny_model(args.out, args.kind, seed=args.seed))


if __name__ == "__main__":
    main()
