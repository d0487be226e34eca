"""Device smoke of the GPU path (issue 16): what of it runs on a lent accelerator machine (torch +
transformers there, no internet, no SGLang) with models made here, one line per check.

    scripts/gpu-smoke.sh [--device cuda|cpu] [--sglang] [--work DIR]

Checks, each printed as ``PASS|FAIL|NOT RUN <check> (<seconds> s): <detail>``:

- device: torch sees the device; on CUDA: name, compute capability (CUDA 13 builds of SGLang
  0.5.23 need >= 7.5: no Volta), bf16, the driver (R580+ for CUDA 13; nvidia-smi);
- models: a tiny math-shepherd PRM, a tiny policy and a tiny sentence-transformers embedder,
  made locally (ets.testing.tiny_models, random weights, trained tokenizers);
- prm-bf16: the reward server's transformers backend on the device in bfloat16 scores the
  same trajectories as a float32 CPU forward pass computed here (P("+") vs "-" at each tag):
  within bf16 tolerance;
- embedder: the reward server's Embedder on the device: unit norms, identical texts -> cosine 1;
- search: ETS (and REBASE) searches over a tiny transformers policy on the device, scored by
  the backend and the embedder above;
- numerics (issue 24): the tiny PRM's "+"/"-" head reshaped to a 7B PRM's logit scale (16-32,
  scores near 0.5): the backend in bf16 on the device must equal the float64 readout of its own
  hidden states to 1e-4 (fp32 scoring; bf16-rounded logits are off by more, printed), and a
  padded batch must score as each trajectory alone (1e-2 in bf16, 1e-4 in float32);
- token-ids: a tiny PRM whose vocabulary holds "▁+" / "▁-" / "▁ки" at the released
  math-shepherd-mistral-7b-prm's ids (648 / 387 / 12902), in a folder named like it: the adapter
  reads those ids, the score positions hold the tag, and the scores on the device are the
  readout of rows 648 / 387;
- reward-server: ``ets reward-serve``'s server in process on the device (transformers backend,
  the tiny PRM and embedder) over gRPC on loopback: health SERVING, Score, Embed, Info, and the
  Prometheus metrics counting them;
- kv-sizing (issue 24, finding 2): SGLang 0.5.23's KV rule on the real card, without SGLang:
  each "engine" is a process of its own (its own CUDA context) that measures free memory,
  allocates the weights of a Mistral-7B, sizes its pool by SGLang's formula
  (ets.engine.gpu_memory) from what it measured and allocates it; the two-GPU profile (one
  engine alone) and the one-GPU profile in both start orders must all get their pool, and the
  measured CUDA context is printed against the estimate;
- sglang-prm (--sglang; finding 6): an SGLang PRM engine on the device scores with
  max_new_tokens 0 + token_ids_logprob (ets.reward.backends.sglang_backend), against the
  transformers backend. SGLang cannot be carried to the lent machines: run it in the reward
  image on a GPU host (docs/deployment.md). Without --sglang it prints NOT RUN, never PASS.

Wheels: a lent machine has torch, transformers, sentence-transformers, grpcio and
prometheus-client but not aiohttp, highspy, math-verify, grpcio-health-checking,
grpcio-reflection or protobuf, and no internet. ``gpu-smoke.sh --prepare-wheels DIR`` downloads
them here (CPython 3.10-3.12, manylinux x86_64, requirements/search.txt's pins); ``--wheels DIR``
installs the ones the machine lacks into the work folder, first on the path.

Exit status 0 only if every check that ran passed. Finishes in a few minutes (the models are
tiny); --device cpu runs the same checks on the CPU (everything but CUDA itself).
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

QUESTION = "What is 3 + 5?"
TRAJECTORIES = [
    ["Step 1: we add the numbers", "Step 2: so 3 + 5 = 8", "Step 3: The answer is 8"],
    ["Step 1: 3 + 5 = 9", "Step 2: The answer is 9"],
    ["first we verify each value", "then the sum of numbers plus the total", "so the final result is 8"],
]
# bf16 keeps 8 bits of mantissa: probabilities from a tiny random model agree to about 1e-2.
BF16_TOLERANCE = 0.05

results: list[tuple[str, str]] = []


def check(name: str, fn: Callable[[], str]) -> bool:
    t0 = time.monotonic()
    try:
        detail = fn()
        status = "PASS"
    except Exception as exc:  # noqa: BLE001 - a smoke reports every failure as its one line
        detail = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:400]
        status = "FAIL"
        traceback.print_exc(file=sys.stderr)
    print(f"{status} {name} ({time.monotonic() - t0:.1f} s): {detail}", flush=True)
    results.append((name, status))
    return status == "PASS"


def not_run(name: str, why: str) -> None:
    print(f"NOT RUN {name}: {why}", flush=True)
    results.append((name, "NOT RUN"))


# What the checks import beyond torch, transformers, sentence-transformers, grpcio and
# prometheus-client (module -> distribution, at requirements/search.txt's pins), then their
# dependencies that such a machine may lack too (gpu-smoke.sh --prepare-wheels downloads the same).
CARRIED = {"aiohttp": "aiohttp", "highspy": "highspy", "math_verify": "math-verify",
           "grpc_health": "grpcio-health-checking", "grpc_reflection": "grpcio-reflection",
           "google.protobuf": "protobuf", "threadpoolctl": "threadpoolctl",
           "aiohappyeyeballs": "aiohappyeyeballs", "aiosignal": "aiosignal", "attr": "attrs",
           "frozenlist": "frozenlist", "multidict": "multidict", "propcache": "propcache", "yarl": "yarl",
           "idna": "idna", "typing_extensions": "typing-extensions", "latex2sympy2_extended": "latex2sympy2-extended",
           "antlr4": "antlr4-python3-runtime"}


def install_wheels(wheels: Path, site: Path) -> str:
    """pip-install, offline from ``wheels``, the carried distributions whose module is missing
    here, into ``site`` (put first on sys.path); the machine's own packages stay as they are."""
    import importlib.util

    missing = []
    for module, dist in CARRIED.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(dist)
    if missing:
        # --no-deps: each missing one is named (numpy, grpcio, sympy are the machine's own).
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--find-links",
                        str(wheels), "--target", str(site), *missing], check=True, capture_output=True, timeout=600)
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
    return f"installed {missing or 'nothing'} from {wheels}"


def check_device(device: str) -> str:
    import torch

    if device == "cpu":
        return f"torch {torch.__version__} on cpu (CUDA not checked: --device cpu)"
    if not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
    major, minor = torch.cuda.get_device_capability(0)
    if (major, minor) < (7, 5):
        raise RuntimeError(f"compute capability {major}.{minor}: CUDA 13 (SGLang 0.5.23's images) needs >= 7.5")
    if not torch.cuda.is_bf16_supported():
        raise RuntimeError("no bf16 on this device")
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    assert torch.isfinite(x @ x).all()
    driver = ""
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        driver = out[0] if out else "?"
        if driver != "?" and int(driver.split(".")[0]) < 580:
            raise RuntimeError(f"driver {driver}: the CUDA 13 images need R580+")
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.get_device_name(0)}, "
            f"capability {major}.{minor}, bf16, driver {driver or 'n/a (no nvidia-smi)'}")


def make_embedder(base: Path, out: Path) -> None:
    """A tiny BERT with the tiny PRM's tokenizer, saved as a sentence-transformers model."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(base)
    bert = out.parent / "tiny-bert"
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, pad_token_id=tok.pad_token_id or 0)
    BertModel(config).save_pretrained(bert)
    tok.save_pretrained(bert)
    st = SentenceTransformer(modules=[Transformer(str(bert)), Pooling(32, "mean"), Normalize()])
    st.save(str(out))


def check_models(work: Path) -> str:
    from ets.testing.tiny_models import make_tiny_model

    for kind, name in (("math-shepherd", "tiny-prm"), ("policy", "tiny-policy")):
        if not (work / name / "config.json").exists():
            make_tiny_model(work / name, kind)
    if not (work / "tiny-embedder" / "modules.json").exists():
        make_embedder(work / "tiny-prm", work / "tiny-embedder")
    return f"tiny-prm, tiny-policy, tiny-embedder in {work}"


def reference_scores(work: Path) -> list[list[float]]:
    """P("+") vs "-" at each step tag of a plain float32 CPU forward pass (no project code
    beyond the adapter's formatting and token ids)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ets.reward.adapters import make_adapter

    tok = AutoTokenizer.from_pretrained(work / "tiny-prm")
    adapter: Any = make_adapter("math-shepherd", tok)
    model = AutoModelForCausalLM.from_pretrained(work / "tiny-prm", dtype=torch.float32).eval()
    out = []
    for steps in TRAJECTORIES:
        enc = adapter.encode(QUESTION, steps)
        with torch.no_grad():
            logits = model(torch.tensor([enc.input_ids])).logits[0]
        out.append([float(torch.sigmoid(logits[p, adapter.plus_id] - logits[p, adapter.minus_id]))
                    for p in enc.score_positions])
    return out


async def backend_scores(work: Path, device: str, dtype: str) -> list[list[float]]:
    from ets.reward.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(str(work / "tiny-prm"), "math-shepherd", device=device, dtype=dtype)
    await backend.start()
    try:
        encoded = [backend.adapter.encode(QUESTION, steps) for steps in TRAJECTORIES]
        return (await backend.score(encoded, last_step_only=False)).scores
    finally:
        await backend.close()


def check_prm(work: Path, device: str) -> str:
    ref = reference_scores(work)
    got = asyncio.run(backend_scores(work, device, "bfloat16"))
    diff = max(abs(a - b) for r, g in zip(ref, got, strict=True) for a, b in zip(r, g, strict=True))
    if [len(r) for r in ref] != [len(g) for g in got] or diff > BF16_TOLERANCE:
        raise AssertionError(f"bf16 on {device} vs float32 CPU: max |diff| {diff:.4f} (tolerance {BF16_TOLERANCE})")
    spread = max(s for g in got for s in g) - min(s for g in got for s in g)
    return f"{sum(map(len, got))} step scores in bf16 on {device}, max |diff| vs float32 CPU {diff:.4f}, " \
           f"spread {spread:.3f}"


def check_embedder(work: Path, device: str) -> str:
    import numpy as np

    from ets.reward.embedder import Embedder

    async def run() -> Any:
        emb = Embedder(str(work / "tiny-embedder"), device=device)
        emb.load()
        return await emb.embed(["3 + 5 = 8", "3 + 5 = 8", "the answer is 9"])

    vecs = np.asarray(asyncio.run(run()))
    norms = np.linalg.norm(vecs, axis=1)
    if not np.allclose(norms, 1, atol=1e-3) or abs(float(vecs[0] @ vecs[1]) - 1) > 1e-3:
        raise AssertionError(f"norms {norms}, cos(same) {float(vecs[0] @ vecs[1])}")
    return f"dim {vecs.shape[1]} on {device}, unit norms, cos(same)=1, cos(other)={float(vecs[0] @ vecs[2]):.3f}"


class TinyPolicy:
    """A StepGenerator over a transformers causal LM on the device (SGLang's role in the service)."""

    def __init__(self, path: Path, device: str, stop: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = device
        self.tok = AutoTokenizer.from_pretrained(path)
        dtype = torch.bfloat16 if device != "cpu" else torch.float32
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        self.model = model.to(device).eval()
        self.stop_id = self.tok.convert_tokens_to_ids(stop)

    def read_step(self, text: str) -> Any:
        from ets.policy.model_types import policy_model_type
        from ets.search.interfaces import StepReading

        mt = policy_model_type("math-shepherd")
        return StepReading(mt.plain_step(text), mt.has_answer(text))

    async def expand(self, requests: Any, params: Any) -> list[list[Any]]:
        from ets.search.interfaces import SampledStep

        out = []
        for req in requests:
            if req.seed is not None:
                self.torch.manual_seed(req.seed)
            ids = self.torch.tensor([list(req.prefix_ids)] * req.n, device=self.device)
            with self.torch.no_grad():
                gen = self.model.generate(ids, do_sample=True, temperature=max(params.temperature, 1e-3),
                                          max_new_tokens=req.max_new_tokens or params.max_new_tokens,
                                          pad_token_id=self.tok.pad_token_id, eos_token_id=self.stop_id)
            steps = []
            for row in gen[:, ids.shape[1]:].tolist():
                finish = "length"
                if self.stop_id in row:
                    row, finish = row[: row.index(self.stop_id) + 1], "step"
                elif self.tok.eos_token_id in row:
                    row, finish = row[: row.index(self.tok.eos_token_id) + 1], "eos"
                steps.append(SampledStep(tuple(row), self.tok.decode(row), finish))  # type: ignore[arg-type]
            out.append(steps)
        return out


class Scorer:
    """A StepScorer over the reward server's transformers backend and embedder."""

    def __init__(self, backend: Any, embedder: Any) -> None:
        self.backend, self.embedder = backend, embedder

    async def score_last_steps(self, trajectories: Any) -> list[float]:
        encoded = [self.backend.adapter.encode(t.question, list(t.steps)) for t in trajectories]
        return [s[-1] for s in (await self.backend.score(encoded, last_step_only=True)).scores]

    async def embed(self, texts: Any) -> Any:
        return await self.embedder.embed(list(texts))


def check_search(work: Path, device: str) -> str:
    from ets.search.config import SearchConfig
    from ets.policy.model_types import policy_model_type
    from ets.reward.backends.transformers_backend import TransformersBackend
    from ets.reward.embedder import Embedder
    from ets.search.interfaces import Root
    from ets.search.loop import run_search

    async def run() -> str:
        policy = TinyPolicy(work / "tiny-policy", device, policy_model_type("math-shepherd").stop[0])
        backend = TransformersBackend(str(work / "tiny-prm"), "math-shepherd", device=device, dtype="bfloat16")
        await backend.start()
        embedder = Embedder(str(work / "tiny-embedder"), device=device)
        embedder.load()
        scorer = Scorer(backend, embedder)
        prompt = policy_model_type("math-shepherd").format_root(QUESTION)
        root = Root(QUESTION, tuple(policy.tok.encode(prompt)))
        parts = []
        try:
            for method in ("ets", "rebase"):
                config = SearchConfig(method=method, width=4, max_depth=3, max_step_tokens=12, max_tokens=200,
                                      seed=7, policy_model_type="math-shepherd", prm_type="math-shepherd")
                res = await run_search(root, config, policy, scorer)
                if not res.trajectories:
                    raise AssertionError(f"{method}: no trajectory")
                parts.append(f"{method}: {len(res.trajectories)} trajectories, "
                             f"{res.stats.generated_tokens} tokens, kv {res.stats.total_kv_tokens}")
        finally:
            await backend.close()
        return "; ".join(parts) + f" (policy, PRM and embedder on {device})"

    return asyncio.run(run())


SCALE = 24.0  # the common part of the "+"/"-" rows: logits of ~16-32, as a 7B PRM's


def make_scaled_prm(work: Path) -> Path:
    """The tiny PRM with its "+"/"-" head rows at a 7B PRM's logit scale (a large shared part,
    a small difference: scores near 0.5, spread), as tests/reward/test_fp32.py makes it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = work / "tiny-prm-scaled"
    if (out / "config.json").exists():
        return out
    model: Any = AutoModelForCausalLM.from_pretrained(work / "tiny-prm", dtype=torch.float32)
    model.config.tie_word_embeddings = False
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    tok = AutoTokenizer.from_pretrained(work / "tiny-prm")
    ids = [tok.convert_tokens_to_ids(t) for t in ("+", "-")]
    g = torch.Generator().manual_seed(7)
    hidden = head.weight.shape[1]
    with torch.no_grad():
        common = torch.randn(hidden, generator=g) / hidden ** 0.5 * SCALE
        head.weight[ids] = common + torch.randn((2, hidden), generator=g) / hidden ** 0.5 * 0.3
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def check_numerics(work: Path, device: str) -> str:
    import torch

    from ets.reward.backends.transformers_backend import TransformersBackend

    path = make_scaled_prm(work)

    async def run(dtype: str) -> tuple[float, float, float, list[float]]:
        backend = TransformersBackend(str(path), "math-shepherd", device=device, dtype=dtype)
        await backend.start()
        try:
            encoded = [backend.adapter.encode(QUESTION, steps) for steps in TRAJECTORIES]
            batched = (await backend.score(encoded, last_step_only=False)).scores
            worst_exact = worst_rounded = worst_batch = 0.0
            scores: list[float] = []
            model, adapter = backend.model, backend.adapter
            w = model.get_output_embeddings().weight[[adapter.plus_id, adapter.minus_id]]
            for enc, in_batch in zip(encoded, batched, strict=True):
                alone = (await backend.score([enc], last_step_only=False)).scores[0]
                ids = torch.tensor([list(enc.last_step_prompt())], device=device)
                with torch.inference_mode():
                    h = model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
                h = h[list(enc.score_positions)]
                exact = (h.double() @ w.double().T).cpu()
                rounded = (h.float() @ w.float().T).to(torch.bfloat16).double().cpu()
                ref = torch.sigmoid(exact[:, 0] - exact[:, 1]).tolist()
                bf16 = torch.sigmoid(rounded[:, 0] - rounded[:, 1]).tolist()
                worst_exact = max(worst_exact, *(abs(a - b) for a, b in zip(alone, ref, strict=True)))
                worst_rounded = max(worst_rounded, *(abs(a - b) for a, b in zip(bf16, ref, strict=True)))
                worst_batch = max(worst_batch, *(abs(a - b) for a, b in zip(alone, in_batch, strict=True)))
                scores += alone
            return worst_exact, worst_rounded, worst_batch, scores
        finally:
            await backend.close()

    exact16, rounded16, batch16, scores = asyncio.run(run("bfloat16"))
    exact32, _, batch32, _ = asyncio.run(run("float32"))
    spread = max(scores) - min(scores)
    if exact16 > 1e-4 or exact32 > 1e-4:
        raise AssertionError(f"scores off the float64 readout: bf16 model {exact16:.2e}, fp32 {exact32:.2e}")
    if batch16 > 1e-2 or batch32 > 1e-4:
        raise AssertionError(f"padded batch vs one at a time: bf16 {batch16:.2e}, fp32 {batch32:.2e}")
    if spread < 0.01:
        raise AssertionError(f"no score spread ({spread:.4f}): the reshaped head did not take")
    return (f"bf16 model: fp32 scoring off the float64 readout by {exact16:.1e} (bf16-rounded logits: "
            f"{rounded16:.3f}); padded batch vs alone {batch16:.1e} (bf16), {batch32:.1e} (fp32); "
            f"spread {spread:.3f}")


# peiyi9979/math-shepherd-mistral-7b-prm's ids (the ETS reference's rebase.py: logits_require_id).
REFERENCE_IDS = {"\u2581+": 648, "\u2581-": 387, "\u2581\u043a\u0438": 12902}


def make_reference_id_prm(work: Path) -> Path:
    """A tiny Llama PRM whose sentencepiece-style vocabulary holds "▁+" / "▁-" / "▁ки" at the
    released model's ids (as tests/reward/test_token_ids.py builds it), in a folder named like
    the released model, so the adapter holds it to those ids; its "+"/"-" rows at a 7B's scale."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ets.testing.tiny_models import spm_like_tokenizer

    out = work / "math-shepherd-mistral-7b-prm"
    if (out / "config.json").exists():
        return out
    words = {w for text in [QUESTION, *(s for t in TRAJECTORIES for s in t)] for w in text.split()}
    fast = spm_like_tokenizer(sorted(words), REFERENCE_IDS, pad_token="</s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=13_000, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=False))
    hidden = 64
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        common = torch.randn(hidden, generator=g) / hidden ** 0.5 * SCALE
        model.lm_head.weight[[648, 387]] = common + torch.randn((2, hidden), generator=g) / hidden ** 0.5 * 0.3
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def check_token_ids(work: Path, device: str) -> str:
    import torch

    from ets.reward.adapters import known_token_ids
    from ets.reward.backends.transformers_backend import TransformersBackend

    path = make_reference_id_prm(work)
    if known_token_ids("math-shepherd", str(path)) is None:
        raise AssertionError(f"{path} is not taken for the released model")

    async def run() -> str:
        backend = TransformersBackend(str(path), "math-shepherd", device=device, dtype="bfloat16")
        await backend.start()
        try:
            adapter: Any = backend.adapter
            if (adapter.plus_id, adapter.minus_id, adapter.tag_id) != (648, 387, 12902):
                raise AssertionError(f"ids {(adapter.plus_id, adapter.minus_id, adapter.tag_id)}")
            encoded = [adapter.encode(QUESTION, steps) for steps in TRAJECTORIES]
            tags = {enc.input_ids[p] for enc in encoded for p in enc.score_positions}
            if tags != {12902}:
                raise AssertionError(f"score positions hold {tags}, not the tag 12902")
            got = (await backend.score(encoded, last_step_only=False)).scores
            w = backend.model.get_output_embeddings().weight[[648, 387]].double()
            worst = 0.0
            for enc, scores in zip(encoded, got, strict=True):
                ids = torch.tensor([list(enc.last_step_prompt())], device=device)
                with torch.inference_mode():
                    h = backend.model.base_model(input_ids=ids).last_hidden_state[0][list(enc.score_positions)]
                logits = h.double() @ w.T
                ref = torch.sigmoid(logits[:, 0] - logits[:, 1]).tolist()
                worst = max(worst, *(abs(a - b) for a, b in zip(scores, ref, strict=True)))
            if worst > 1e-2:  # batched bf16 hidden states vs one at a time
                raise AssertionError(f"scores off the readout of rows 648/387 by {worst:.4f}")
            return (f"adapter reads 648/387 at tag 12902 (the released model's), {sum(map(len, got))} scores "
                    f"on {device} within {worst:.1e} of rows 648/387's readout")
        finally:
            await backend.close()

    return asyncio.run(run())


def check_reward_server(work: Path, device: str) -> str:
    import urllib.request

    import grpc

    from ets.api.v1 import reward_pb2, reward_pb2_grpc
    from ets.healthcheck import check as health_check
    from ets.reward.server import RewardServer
    from ets.reward.settings import RewardServerConfig

    async def run() -> str:
        config = RewardServerConfig(
            prm_model=str(make_scaled_prm(work)), prm_type="math-shepherd", prm_backend="transformers",
            prm_dtype="bfloat16", device=device, host="127.0.0.1", port=0, metrics_port=0,
            embedder_model=str(work / "tiny-embedder"), max_batch_size=16)
        server = RewardServer(config)
        await server.start()
        try:
            address = f"127.0.0.1:{server.port}"
            health = await asyncio.to_thread(health_check, address, "ets.api.v1.RewardService", 10.0)
            if health != "SERVING":
                raise AssertionError(f"health {health}")
            async with grpc.aio.insecure_channel(address) as channel:
                stub = reward_pb2_grpc.RewardServiceStub(channel)
                reply = await stub.Score(reward_pb2.ScoreRequest(trajectories=[
                    reward_pb2.Trajectory(question=QUESTION, steps=steps) for steps in TRAJECTORIES]), timeout=120)
                emb = await stub.Embed(reward_pb2.EmbedRequest(texts=["3 + 5 = 8", "the answer is 9"]), timeout=60)
                info = await stub.Info(reward_pb2.InfoRequest(), timeout=30)
            lengths = [len(r.scores) for r in reply.results]
            if (lengths != [len(t) for t in TRAJECTORIES] or len(emb.embeddings) != 2
                    or info.prm_backend != "transformers"):
                raise AssertionError(f"Score {lengths}, Embed {len(emb.embeddings)}, Info {info.prm_backend}")
            metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(
                f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode())
            for needle in ('ets_reward_requests_total{code="OK",method="Score"} 1.0',
                           'ets_reward_requests_total{code="OK",method="Embed"} 1.0', "ets_reward_backend_up 1.0"):
                if needle not in metrics:
                    raise AssertionError(f"metrics lack {needle!r}")
            return (f"gRPC on {device}: health SERVING, Score {lengths} steps, Embed dim {emb.dim}, "
                    f"Info {info.prm_type}/{info.prm_backend}, metrics count both calls")
        finally:
            await server.stop(grace=1.0)

    return asyncio.run(run())


# One "engine" of the kv-sizing check, run as a process of its own (its own CUDA context):
# argv: fraction, max tokens (0: none), weights bytes, cell bytes, a file to write its
# measurements to, and a file whose existence tells it to exit (it holds its memory until then).
ENGINE_EMULATION = r"""
import json, os, sys, time, torch
fraction, max_tokens, weights, cell = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out, release = sys.argv[5], sys.argv[6]
torch.cuda.init(); torch.empty(1, device="cuda")
total = torch.cuda.mem_get_info()[1]
before = torch.cuda.mem_get_info()[0]               # B, after the CUDA context (SGLang's baseline)
held = [torch.empty(weights, dtype=torch.uint8, device="cuda")]
after = torch.cuda.mem_get_info()[0]                # A, after the weights
budget = after - before * (1 - fraction)            # SGLang 0.5.23: rest_memory
tokens = int(budget // cell) if budget > 0 else 0
if max_tokens:
    tokens = min(tokens, max_tokens)
if tokens > 0:
    held.append(torch.empty(tokens * cell, dtype=torch.uint8, device="cuda"))
with open(out + ".tmp", "w") as f:
    json.dump({"total": total, "before": before, "after": after, "budget": budget, "tokens": tokens,
               "free_after_pool": torch.cuda.mem_get_info()[0]}, f)
os.replace(out + ".tmp", out)  # whole, or not there yet
while not os.path.exists(release):
    time.sleep(0.2)
"""


def check_kv_sizing(work: Path, device: str) -> str:
    import json
    import os

    import torch

    from ets.engine import gpu_memory

    if device != "cuda":
        raise RuntimeError("needs the CUDA card (run with --device cuda)")
    free0, total = torch.cuda.mem_get_info()
    spec = gpu_memory.MISTRAL_7B

    def engines(order: list[tuple[str, float, int | None]]) -> list[dict[str, Any]]:
        release = work / f"release-{os.getpid()}-{time.monotonic_ns()}"
        procs, found = [], []
        try:
            for i, (name, fraction, cap) in enumerate(order):
                out = work / f"engine-{name}-{i}.json"
                out.unlink(missing_ok=True)
                procs.append(subprocess.Popen([sys.executable, "-c", ENGINE_EMULATION, str(fraction), str(cap or 0),
                                               str(spec.weights), str(spec.cell), str(out), str(release)]))
                deadline = time.monotonic() + 120
                while not out.exists():  # the next one starts once this one holds its pool
                    if procs[-1].poll() is not None:
                        raise AssertionError(f"{name} exited {procs[-1].returncode} (out of memory?)")
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{name} did not size its pool in 120 s")
                    time.sleep(0.2)
                found.append(dict(json.loads(out.read_text()), name=name))
        finally:
            release.touch()
            for p in procs:
                p.wait(timeout=60)
        return found

    profiles = gpu_memory.PROFILES
    one, two = profiles["one-gpu"], profiles["two-gpu"]
    parts = []
    for label, order in (
        ("two-gpu policy alone", [("policy", two.policy_fraction, two.policy_max_tokens)]),
        ("two-gpu prm alone", [("prm", two.prm_fraction, two.prm_max_tokens)]),
        ("one-gpu policy then prm", [("policy", one.policy_fraction, one.policy_max_tokens),
                                     ("prm", one.prm_fraction, one.prm_max_tokens)]),
        ("one-gpu prm then policy", [("prm", one.prm_fraction, one.prm_max_tokens),
                                     ("policy", one.policy_fraction, one.policy_max_tokens)]),
    ):
        runs = engines(order)
        short = [r["name"] for r in runs if r["tokens"] < gpu_memory.MIN_KV_TOKENS]
        if short:
            raise AssertionError(f"{label}: {short} got a pool below {gpu_memory.MIN_KV_TOKENS} tokens: {runs}")
        parts.append(f"{label}: " + ", ".join(f"{r['name']} {r['tokens']} tokens" for r in runs)
                     + f" ({runs[-1]['free_after_pool'] / gpu_memory.GIB:.1f} GiB left)")
    context = total - free0
    return (f"{torch.cuda.get_device_name(0)}, {total / gpu_memory.GIB:.1f} GiB; this process's CUDA context "
            f"{context / gpu_memory.GIB:.2f} GiB (estimate {gpu_memory.CUDA_CONTEXT / gpu_memory.GIB:.1f}); "
            + "; ".join(parts))


def check_sglang_prm(work: Path, device: str) -> str:
    from prometheus_client import CollectorRegistry

    from ets.engine.process import free_port
    from ets.reward.metrics import RewardMetrics
    from ets.reward.settings import RewardServerConfig, build_backend

    async def run() -> str:
        # The reward server's own construction of its SGLang PRM engine (what the image runs).
        config = RewardServerConfig.from_env({
            "ETS_PRM_BACKEND": "sglang", "ETS_PRM_TYPE": "math-shepherd", "ETS_PRM_MODEL": str(work / "tiny-prm"),
            "ETS_DEVICE": device, "ETS_PRM_PORT": str(free_port()), "ETS_PRM_HOST": "127.0.0.1",
            "ETS_PRM_START_TIMEOUT_S": "420"})
        backend: Any = build_backend(config, RewardMetrics(CollectorRegistry()))
        await backend.start()
        try:
            encoded = [backend.adapter.encode(QUESTION, steps) for steps in TRAJECTORIES]
            got = (await backend.score(encoded, last_step_only=False)).scores
        finally:
            await backend.close()
        ref = reference_scores(work)
        diff = max(abs(a - b) for r, g in zip(ref, got, strict=True) for a, b in zip(r, g, strict=True))
        if diff > BF16_TOLERANCE:
            raise AssertionError(f"SGLang (max_new_tokens 0, token_ids_logprob) vs float32 reference: {diff:.4f}")
        return f"{sum(map(len, got))} step scores via max_new_tokens=0 + token_ids_logprob, max |diff| {diff:.4f}"

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--sglang", action="store_true", help="also start an SGLang PRM engine (finding 6)")
    ap.add_argument("--work", type=Path, help="folder for the tiny models (default: a temporary one)")
    ap.add_argument("--wheels", type=Path, help="install the carried wheels (--prepare-wheels) this machine lacks")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="ets-gpu-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.wheels:
        check("wheels", lambda: install_wheels(args.wheels, work / "site"))
    print(f"gpu-smoke: device {args.device}, models in {work}", flush=True)
    if check("device", lambda: check_device(args.device)) and check("models", lambda: check_models(work)):
        check("prm-bf16", lambda: check_prm(work, args.device))
        check("embedder", lambda: check_embedder(work, args.device))
        check("search", lambda: check_search(work, args.device))
        check("numerics", lambda: check_numerics(work, args.device))
        check("token-ids", lambda: check_token_ids(work, args.device))
        check("reward-server", lambda: check_reward_server(work, args.device))
        if args.device == "cuda":
            check("kv-sizing", lambda: check_kv_sizing(work, args.device))
        else:
            not_run("kv-sizing", "needs the CUDA card")
        if args.sglang:
            check("sglang-prm", lambda: check_sglang_prm(work, args.device))
        else:
            not_run("sglang-prm", "needs SGLang (not on the lent machines): run with --sglang in the reward image")
    failed = [n for n, s in results if s == "FAIL"]
    print(f"gpu-smoke: {sum(s == 'PASS' for _, s in results)} passed, {len(failed)} failed, "
          f"{sum(s == 'NOT RUN' for _, s in results)} not run, {time.monotonic() - t0:.0f} s", flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
