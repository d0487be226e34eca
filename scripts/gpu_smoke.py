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
- sglang-prm (--sglang; finding 6): an SGLang PRM engine on the device scores with
  max_new_tokens 0 + token_ids_logprob (ets.reward.backends.sglang_backend), against the
  transformers backend. SGLang cannot be carried to the lent machines: run it in the reward
  image on a GPU host (docs/deployment.md). Without --sglang it prints NOT RUN, never PASS.

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
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="ets-gpu-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"gpu-smoke: device {args.device}, models in {work}", flush=True)
    if check("device", lambda: check_device(args.device)) and check("models", lambda: check_models(work)):
        check("prm-bf16", lambda: check_prm(work, args.device))
        check("embedder", lambda: check_embedder(work, args.device))
        check("search", lambda: check_search(work, args.device))
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
