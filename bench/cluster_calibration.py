"""Calibrate ETS's clustering cut for an embedder: how sampled first steps cluster at each cut.

    python bench/cluster_calibration.py --policy-url http://127.0.0.1:30000 \\
        --policy-model-type smollm2-instruct --problems 12 --samples 16 \\
        --out bench/results/cluster_calibration.json

For each of the first ``--problems`` problems of the dataset (default: the easiest GSM8K ones),
``--samples`` first steps are sampled from the policy server exactly as the search's first
expansion does (same root formatting, step delimiter, step-token budget and temperature), each
step's plain text is embedded with the embedder (default: the packaged all-MiniLM-L6-v2) and
clustered by the search's own code (``ets.search.clustering``: average linkage on cosine
distance) at every cut in ``--cuts``. Reported per cut: clusters per problem (of N samples) and
how well "same cluster" agrees with an embedder-free proxy of "same arithmetic": the two steps
state the same numbers (the multiset of numbers in their text; pairs where both state none are
left out). ``best_agreement_cut`` is the cut with the best pair F1 against that proxy; read it
with its F1 (a low F1 at every cut says the embedder groups by wording, not by arithmetic, and
the cut has to be chosen from the search's own accuracy and KV, ``ets eval --sweep``). Also
reported: each problem's closest and median pairwise distance. Without ``--policy-url`` the
policy server is started (``--policy-model``) and stopped at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CUTS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def numbers(text: str) -> tuple[str, ...]:
    """The numbers a step states, sorted (thousands separators dropped, trailing ".0" kept apart)."""
    return tuple(sorted(n.replace(",", "") for n in _NUMBER.findall(text)))


def pair_agreement(labels: Sequence[int], keys: Sequence[tuple[str, ...]]) -> dict[str, float]:
    """Pairwise precision / recall / F1 of "same cluster" against "same numbers" (pairs where
    both steps state no number are skipped: the proxy says nothing about them)."""
    tp = fp = fn = 0
    n = len(labels)
    for i in range(n):
        for j in range(i + 1, n):
            if not keys[i] and not keys[j]:
                continue
            same_cluster, same_key = labels[i] == labels[j], keys[i] == keys[j]
            tp += same_cluster and same_key
            fp += same_cluster and not same_key
            fn += same_key and not same_cluster
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1}


def cluster_counts(embeddings: np.ndarray, cuts: Sequence[float]) -> dict[float, list[int]]:
    """Cluster label per step at each cut (the search's own clustering)."""
    from ets.search.clustering import cluster_steps

    return {cut: [int(x) for x in cluster_steps(embeddings, cut)] for cut in cuts}


def analyse(problems: list[dict[str, Any]], cuts: Sequence[float]) -> dict[str, Any]:
    """Per-cut summary over problems (each with ``labels`` per cut and ``numbers`` per step)."""
    per_cut: list[dict[str, Any]] = []
    for cut in cuts:
        key = f"{cut:g}"
        clusters = [len(set(p["labels"][key])) for p in problems]
        totals: Counter[str] = Counter()
        for p in problems:
            agreement = pair_agreement(p["labels"][key], [tuple(k) for k in p["numbers"]])
            totals.update({k: agreement[k] for k in ("tp", "fp", "fn")})
        tp, fp, fn = totals["tp"], totals["fp"], totals["fn"]
        precision = tp / (tp + fp) if tp + fp else 1.0
        recall = tp / (tp + fn) if tp + fn else 1.0
        per_cut.append({
            "cut": cut, "clusters": clusters, "samples": [len(p["steps"]) for p in problems],
            "mean_clusters": statistics.fmean(clusters),
            "mean_cluster_share": statistics.fmean(len(set(p["labels"][key])) / len(p["steps"]) for p in problems),
            "pair_precision": precision, "pair_recall": recall,
            "pair_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        })
    best = max(per_cut, key=lambda c: (round(float(c["pair_f1"]), 6), -float(c["cut"])))
    return {"per_cut": per_cut, "best_agreement_cut": best["cut"], "best_agreement_f1": best["pair_f1"]}


async def sample_first_steps(policy_url: str, questions: Sequence[str], model_type_name: str, samples: int,
                             step_tokens: int, temperature: float) -> list[list[str]]:
    """``samples`` first steps per question, as the search's depth-0 expansion samples them."""
    from ets.policy.model_types import policy_model_type
    from ets.policy.client import PolicyClient, SamplingParams
    from ets.policy.generator import tokenize_root

    model_type = policy_model_type(model_type_name)
    params = SamplingParams(max_new_tokens=step_tokens, temperature=temperature, stop=model_type.stop,
                            no_stop_trim=model_type.no_stop_trim)
    out: list[list[str]] = []
    async with PolicyClient(policy_url) as client:
        for question in questions:
            root = await tokenize_root(client, question, model_type)
            drawn = await client.generate_one(root.prompt_ids, params, n=samples)
            out.append([model_type.plain_step(s.text) for s in drawn])
    return out


async def _embed_all(embedder: Any, steps: Sequence[Sequence[str]]) -> list[np.ndarray]:
    try:
        return [await embedder.embed(list(texts)) for texts in steps]
    finally:
        await embedder.close()


def main(argv: list[str]) -> int:
    from ets.search.config import SearchConfig

    defaults = SearchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", type=Path, default=REPO / "bench" / "data" / "gsm8k_easy.jsonl")
    p.add_argument("--problems", type=int, default=12)
    p.add_argument("--samples", type=int, default=16, help="first steps per problem (the search width)")
    p.add_argument("--policy-url", default=None, help="a running policy SGLang server")
    p.add_argument("--policy-model", type=Path, default=None, help="without --policy-url: model folder to serve")
    p.add_argument("--policy-model-type", default=defaults.policy_model_type)
    p.add_argument("--step-tokens", type=int, default=defaults.max_step_tokens)
    p.add_argument("--temperature", type=float, default=defaults.temperature)
    p.add_argument("--embedder", default=None, help="sentence-transformers model (default: packaged MiniLM)")
    p.add_argument("--cuts", default=",".join(f"{c:g}" for c in DEFAULT_CUTS))
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cluster_calibration.json")
    args = p.parse_args(argv)
    if args.policy_url is None and args.policy_model is None:
        p.error("give --policy-url or --policy-model")
    cuts = [float(c) for c in args.cuts.split(",") if c.strip()]

    from ets.evaluation.evaluate import load_dataset

    problems = load_dataset(args.dataset, args.problems)
    started = time.perf_counter()
    server = None
    try:
        policy_url = args.policy_url
        if policy_url is None:
            from ets.engine.launcher import LaunchConfig
            from ets.engine.process import ServerProcess, free_port

            log = Path(tempfile.mkdtemp(prefix="ets-calib-")) / "policy.log"
            server = ServerProcess.launch(LaunchConfig(model_path=str(args.policy_model), host="127.0.0.1",
                                                       port=free_port("127.0.0.1"), device="cpu", random_seed=0),
                                          log_path=log, name="policy")
            server.wait_healthy(timeout=600)
            policy_url = server.url
        steps = asyncio.run(sample_first_steps(policy_url, [q.problem for q in problems], args.policy_model_type,
                                               args.samples, args.step_tokens, args.temperature))
    finally:
        if server is not None:
            server.stop(timeout=20.0)
    sampled_s = time.perf_counter() - started

    from ets.reward.embedder import Embedder
    from ets.search.clustering import cosine_distances

    embedder = Embedder(args.embedder)
    embedder.load()
    embeddings = asyncio.run(_embed_all(embedder, steps))
    rows: list[dict[str, Any]] = []
    for problem, texts, emb in zip(problems, steps, embeddings, strict=True):
        dist = cosine_distances(emb)
        upper = dist[np.triu_indices(len(texts), 1)]
        labels = cluster_counts(emb, cuts)
        rows.append({
            "id": problem.id, "steps": texts, "numbers": [list(numbers(t)) for t in texts],
            "distinct_texts": len(set(texts)),
            "closest_pair": float(upper.min()) if upper.size else 0.0,
            "median_pair": float(np.median(upper)) if upper.size else 0.0,
            "labels": {f"{c:g}": labels[c] for c in cuts},
        })
    result = analyse(rows, cuts)
    report = {
        "command": "python bench/cluster_calibration.py " + " ".join(argv),
        "settings": {"dataset": str(args.dataset), "problems": len(problems), "samples": args.samples,
                     "policy_model_type": args.policy_model_type, "step_tokens": args.step_tokens,
                     "temperature": args.temperature, "embedder": embedder.model_name, "cuts": cuts},
        "sampling_seconds": sampled_s, **result, "problems": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"| cut | clusters per problem (of {args.samples}) | mean | pair precision | pair recall | pair F1 |")
    print("|---:|---|---:|---:|---:|---:|")
    for c in result["per_cut"]:
        print(f"| {c['cut']:g} | {min(c['clusters'])}-{max(c['clusters'])} | {c['mean_clusters']:.1f} | "
              f"{c['pair_precision']:.2f} | {c['pair_recall']:.2f} | {c['pair_f1']:.2f} |")
    closest = [r["closest_pair"] for r in rows]
    print(f"\nclosest pair per problem {min(closest):.3f}-{max(closest):.3f}; "
          f"best same-numbers agreement at cut {result['best_agreement_cut']:g} "
          f"(pair F1 {result['best_agreement_f1']:.2f}); results in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
