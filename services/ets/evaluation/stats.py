"""Paired statistics of ``ets eval``: each configuration against REBASE on the same problems (pure).

Owns the per-problem KV ratio (REBASE / configuration, logical KV total and peak) summarised by
its geometric mean with a 95% percentile bootstrap interval over problems, the accuracy of both
with Wilson intervals, the paired accuracy difference (discordant pairs, the exact McNemar p, a
paired bootstrap interval), and the goal line: at which (width, lambda_c) ETS reaches REBASE's
accuracy with REBASE/ETS KV >= ``GOAL_PAPER`` (1.8x) or ``GOAL_OURS`` (2x).

"Reaches REBASE's accuracy" is read as: the paired difference's 95% interval reaches 0 or above
(ETS not shown worse) and the mean difference is at least ``-ACCURACY_MARGIN`` (2 points). It needs
a right answer on either side: where neither answered any problem right, accuracy was not
measured (0% = 0% says nothing about holding it), and no goal is met.
The KV goal is judged on the geometric mean; its interval's low end is reported beside it.
Bootstraps use a fixed seed, so a report rebuilt from the same results is identical.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ets.evaluation.report import (ProblemResult, accuracy_measured, answers_match, by_configuration,
                                  wilson_interval)

GOAL_PAPER = 1.8
GOAL_OURS = 2.0
ACCURACY_MARGIN = 0.02
BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0
REFERENCE = "rebase"


def _resamples(n: int, samples: int, seed: int) -> np.ndarray:
    """(samples, n) indices of problems drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def geometric_mean_ci(ratios: Sequence[float], *, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                      level: float = 0.95) -> tuple[float, float, float]:
    """Geometric mean of positive ``ratios`` and its percentile bootstrap interval over them."""
    logs = np.log(np.asarray(ratios, dtype=float))
    if logs.size == 0:
        return math.nan, math.nan, math.nan
    if not np.all(np.isfinite(logs)):
        raise ValueError("ratios: must all be positive and finite")
    means = logs[_resamples(logs.size, samples, seed)].mean(axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(math.exp(logs.mean())), float(math.exp(lo)), float(math.exp(hi))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: discordant pairs ``b`` and ``c`` under Binomial(b + c, 1/2)."""
    if b < 0 or c < 0:
        raise ValueError("discordant counts must be >= 0")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_difference_ci(x: Sequence[bool], y: Sequence[bool], *, samples: int = BOOTSTRAP_SAMPLES,
                         seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``x - y`` (per-problem correctness of two configurations) with a paired percentile
    bootstrap interval (problems resampled, both kept together)."""
    if len(x) != len(y):
        raise ValueError("x and y must pair the same problems")
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    if d.size == 0:
        return math.nan, math.nan, math.nan
    means = d[_resamples(d.size, samples, seed)].mean(axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(d.mean()), float(lo), float(hi)


def compare(mine: Sequence[ProblemResult], theirs: Sequence[ProblemResult]) -> dict[str, Any]:
    """One configuration (``mine``) against the reference (``theirs``) on the problems both finished."""
    a = {r.id: r for r in mine if not r.error}
    b = {r.id: r for r in theirs if not r.error}
    ids = [i for i in b if i in a]
    out: dict[str, Any] = {"problems": len(ids)}
    if not ids:
        return out
    total = [b[i].total_kv_tokens / a[i].total_kv_tokens for i in ids]
    peak = [b[i].peak_kv_tokens / a[i].peak_kv_tokens for i in ids]
    gm, lo, hi = geometric_mean_ci(total)
    pgm, plo, phi = geometric_mean_ci(peak)
    x = [a[i].correct for i in ids]
    y = [b[i].correct for i in ids]
    mine_only = sum(1 for p, q in zip(x, y, strict=True) if p and not q)
    theirs_only = sum(1 for p, q in zip(x, y, strict=True) if q and not p)
    diff, dlo, dhi = paired_difference_ci(x, y)
    acc_lo, acc_hi = wilson_interval(sum(x), len(ids))
    ref_lo, ref_hi = wilson_interval(sum(y), len(ids))
    out.update({
        "kv_ratio_total": gm, "kv_ratio_total_ci": [lo, hi],
        "kv_ratio_peak": pgm, "kv_ratio_peak_ci": [plo, phi],
        "accuracy": sum(x) / len(ids), "accuracy_ci": [acc_lo, acc_hi],
        "reference_accuracy": sum(y) / len(ids), "reference_accuracy_ci": [ref_lo, ref_hi],
        "accuracy_difference": diff, "accuracy_difference_ci": [dlo, dhi],
        "discordant": {"only_this": mine_only, "only_reference": theirs_only},
        "mcnemar_p": mcnemar_exact(mine_only, theirs_only),
        "oracle": sum(a[i].oracle for i in ids) / len(ids),
        "reference_oracle": sum(b[i].oracle for i in ids) / len(ids),
        "identical_trees": sum(1 for i in ids if a[i].tree and a[i].tree == b[i].tree),
        "per_problem": [{"id": i, "kv_total": a[i].total_kv_tokens, "reference_kv_total": b[i].total_kv_tokens,
                         "kv_peak": a[i].peak_kv_tokens, "reference_kv_peak": b[i].peak_kv_tokens,
                         "correct": a[i].correct, "reference_correct": b[i].correct} for i in ids],
    })
    measured = accuracy_measured(sum(x), sum(y))
    holds = measured and dhi >= 0 and diff >= -ACCURACY_MARGIN
    out["accuracy_measured"] = measured
    out["accuracy_holds"] = bool(holds)
    out["goal_paper"] = bool(holds and gm >= GOAL_PAPER)
    out["goal_ours"] = bool(holds and gm >= GOAL_OURS)
    out["verdict"] = verdict(out)
    return out


def verdict(c: dict[str, Any]) -> str:
    """The goal line in words, with the reason when it is not met."""
    kv = c["kv_ratio_total"]
    if c["goal_ours"]:
        return f"met ({kv:.2f}x >= {GOAL_OURS}x at REBASE's accuracy)"
    if c["goal_paper"]:
        return f"paper's goal met ({kv:.2f}x >= {GOAL_PAPER}x), ours ({GOAL_OURS}x) not"
    reasons = []
    if kv < GOAL_PAPER:
        reasons.append(f"KV ratio {kv:.2f}x < {GOAL_PAPER}x")
    if not c["accuracy_measured"]:
        reasons.append(f"accuracy not measured (no right answer on either side in {c['problems']} problems)")
    elif not c["accuracy_holds"]:
        reasons.append(f"accuracy {100 * c['accuracy_difference']:+.1f} points "
                       f"(interval {100 * c['accuracy_difference_ci'][0]:+.0f} to "
                       f"{100 * c['accuracy_difference_ci'][1]:+.0f})")
    return "not met: " + "; ".join(reasons)


def _stop_on(overrides: dict[str, Any]) -> bool:
    return overrides.get("early_stop") is True


def _find(groups: dict[tuple[str, int], list[ProblemResult]], method: str, width: int,
          overrides: dict[str, Any]) -> list[ProblemResult] | None:
    """The group of ``method`` at ``width`` run with ``overrides`` (an explicit ``early_stop``
    False is the default, the same run as none)."""
    def same(o: dict[str, Any]) -> bool:
        return {k: v for k, v in o.items() if not (k == "early_stop" and v is False)} == overrides
    return next((g for (_, w), g in groups.items()
                 if w == width and g[0].method == method and same(dict(g[0].overrides))), None)


def paired_comparisons(results: Sequence[ProblemResult], reference: str = REFERENCE) -> list[dict[str, Any]]:
    """Every configuration against ``reference`` (with the same ``early_stop``: an early-stopped
    ETS against an early-stopped REBASE, so the KV ratio is ETS's own) at the same width, paired
    by problem, sorted by width then label. Only ETS rows carry the goal line (other methods:
    ``goal_paper`` False)."""
    groups = by_configuration(results)
    out = []
    for (label, width), rs in groups.items():
        if rs[0].method == reference:
            continue
        ref = _find(groups, reference, width, {"early_stop": True} if _stop_on(dict(rs[0].overrides)) else {})
        if ref is None:
            continue
        row = {"width": width, "label": label, "reference": ref[0].label, "method": rs[0].method,
               "overrides": dict(rs[0].overrides), **compare(rs, ref)}
        if row["method"] != "ets" and row.get("problems"):
            row["goal_paper"] = row["goal_ours"] = False
            row["verdict"] = "reference method (no goal)"
        out.append(row)
    return out


def goal_line(comparisons: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The report's headline: the ETS rows meeting each goal, or the best ratio at which accuracy held."""
    ets = [c for c in comparisons if c["method"] == "ets" and c.get("problems")]
    held = [c for c in ets if c["accuracy_holds"]]
    best = max(held, key=lambda c: c["kv_ratio_total"], default=None)
    return {
        "paper": [(c["width"], c["label"]) for c in ets if c["goal_paper"]],
        "ours": [(c["width"], c["label"]) for c in ets if c["goal_ours"]],
        "best_with_accuracy_held": None if best is None else {
            "width": best["width"], "label": best["label"], "kv_ratio_total": best["kv_ratio_total"],
            "kv_ratio_total_ci": best["kv_ratio_total_ci"], "problems": best["problems"]},
        "paper_met": any(c["goal_paper"] for c in ets),
        "ours_met": any(c["goal_ours"] for c in ets),
    }


def _saved(early: Sequence[ProblemResult], full: Sequence[ProblemResult], name: str) -> dict[str, float]:
    """``name`` summed over the early-stopped runs and their full ones, and the share saved."""
    e = sum(getattr(r, name) for r in early)
    f = sum(getattr(r, name) for r in full)
    return {"early": e, "full": f, "saved": f - e, "saved_share": (f - e) / f if f else 0.0}


def early_stop_comparisons(results: Sequence[ProblemResult]) -> list[dict[str, Any]]:
    """Each early-stopped configuration (``early_stop=True`` among its overrides) against the same
    configuration without it, per width, paired by problem: how many searches stopped early, whether
    every one of those chose the full search's answer (the guarantee; mismatches listed), and what
    it saved: generated tokens, logical KV and samples requested (sums and share of the full runs').
    ``drawn_by_early`` counts the samples the early-stopped runs had to draw from the policy (their
    trees are prefixes of the full ones, so with the full run in the same store this is about 0)."""
    groups = by_configuration(results)
    out = []
    for (label, width), rs in groups.items():
        overrides = dict(rs[0].overrides)
        if not _stop_on(overrides):
            continue
        del overrides["early_stop"]
        full = _find(groups, rs[0].method, width, overrides)
        if full is None:
            continue
        a = {r.id: r for r in rs if not r.error}
        b = {r.id: r for r in full if not r.error}
        ids = [i for i in b if i in a]
        stopped = [i for i in ids if a[i].stopped_early]
        # The guarantee is the answer group, not its text (a later member of the group may word it
        # differently), so equal means mathematically equivalent.
        mismatches = [{"id": i, "early": a[i].answer, "full": b[i].answer} for i in stopped
                      if a[i].answer != b[i].answer and not answers_match(a[i].answer, b[i].answer)]

        out.append({
            "width": width, "label": label, "full_label": full[0].label, "method": rs[0].method,
            "problems": len(ids), "stopped": len(stopped),
            "width_left_mean": (sum(a[i].width_left for i in stopped) / len(stopped)) if stopped else 0.0,
            "same_answer_where_stopped": len(stopped) - len(mismatches), "mismatches": mismatches,
            "same_correctness": sum(1 for i in ids if a[i].correct == b[i].correct),
            **{name: _saved([a[i] for i in ids], [b[i] for i in ids], name)
               for name in ("generated_tokens", "total_kv_tokens", "samples_requested")},
            "drawn_by_early": sum(a[i].samples_drawn for i in ids),
        })
    return out
