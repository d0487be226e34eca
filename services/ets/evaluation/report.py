"""What ``ets eval`` reports, from per-search results: pure summaries, tables and the plot.

Owns: ``ProblemResult`` (one search of one problem, as written to the JSONL), per-run
``Summary`` (accuracy with a 95% Wilson interval, answered and oracle rates, logical KV total
and peak, tokens, wall time, engine cache reuse, kept share), the paired ETS-vs-REBASE comparison
against the paper's goal (REBASE's accuracy at >= ``KV_REDUCTION_GOAL`` x less KV), the text and
Markdown tables, and the accuracy-vs-KV plot. ``ets.evaluation.evaluate`` runs the searches.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from ets.search import answers

Z_95 = 1.959963984540054  # two-sided 95% normal quantile
# ETS reaches REBASE's accuracy with at least this much less logical KV: the paper's headline.
KV_REDUCTION_GOAL = 1.8


def fmt_value(value: Any) -> str:
    """A setting value as run labels write it (floats in %g)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def accuracy_measured(*correct: int) -> bool:
    """Whether two configurations' accuracies can be compared: some right answer on either side.
    0% against 0% says nothing about one holding the other's accuracy."""
    return any(c > 0 for c in correct)


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (sound at 0/n and n/n, unlike the normal
    approximation); (0, 1) when there are no trials."""
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"successes: need 0 <= successes <= trials, got {successes}/{trials}")
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    z2 = z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    # Exact at the edges (0/n starts at 0, n/n ends at 1), where rounding would nudge them.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


@dataclass
class ProblemResult:
    id: str
    label: str
    method: str
    width: int
    reference: str
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    answer: str = ""
    correct: bool = False
    oracle: bool = False  # some finished candidate's answer is right
    error: str = ""
    total_kv_tokens: int = 0
    peak_kv_tokens: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    model_calls: int = 0
    selections: int = 0
    depth_reached: int = 0
    solver_fallbacks: int = 0
    wall_seconds: float = 0.0
    selection_seconds: float = 0.0
    policy_seconds: float = 0.0
    reward_seconds: float = 0.0
    candidates: int = 0
    frontier: int = 0  # candidates offered to the selection, summed over depths
    kept: int = 0      # of those, given at least one child
    solver_time_limits: int = 0  # ETS programs that hit their time limit (a rerun may then differ)
    # In-process runs over a sample store (``ets eval --store``): samples this search asked for and
    # how many of them had to be drawn from the policy (the rest came from the store).
    samples_requested: int = 0
    samples_drawn: int = 0
    tree: str = ""     # digest of the finished trajectories (ets.evaluation.store.tree_digest)
    literal_n: int = 0  # finished candidates whose answer is a literal "N" (the copied instruction)
    stopped_early: bool = False  # the exact early stop ended it (config.early_stop: vote decided)
    width_left: int = 0          # width it left unspent then
    resolved_config: dict[str, Any] = field(default_factory=dict)
    # Numeric references (GSM8K, the arithmetic sets): the vote over the same candidates with the
    # flexible extraction (the last number of each text, lm-evaluation-harness's GSM8K reading);
    # ``answer`` / ``correct`` are the strict one (the answer marker).
    numeric: bool = False
    flexible_answer: str = ""
    flexible_correct: bool = False

    @property
    def key(self) -> tuple[str, int, str]:
        return self.label, self.width, self.id


# The search statistics a ProblemResult copies; the gRPC ``SearchStats`` and the core's have them all.
STAT_FIELDS = ("total_kv_tokens", "peak_kv_tokens", "generated_tokens", "prompt_tokens", "cached_prompt_tokens",
               "model_calls", "selections", "depth_reached", "solver_fallbacks",
               "selection_seconds", "policy_seconds", "reward_seconds", "stopped_early", "width_left")


def answers_match(predicted: str, reference: str) -> bool:
    """Mathematical equivalence of a predicted and a reference answer (ets.search.answers)."""
    return bool(predicted.strip()) and bool(answers.equivalent(predicted, reference))


_NUMERIC = re.compile(r"-?[\d,]*\.?\d+")


def is_numeric(reference: str) -> bool:
    """A reference that is a plain number ("72", "-3.5", "1,000"): strict and flexible extraction
    are both reported for it."""
    return bool(_NUMERIC.fullmatch(reference.strip()))


def grade(result: ProblemResult, answer: str, candidate_answers: Sequence[str], stats: Any,
          candidates: Sequence[tuple[str, float]] = (), voting: str = "weighted_majority") -> ProblemResult:
    """``result`` with the chosen answer, whether it (or any finished candidate: the oracle) is
    right, and ``stats``' ``STAT_FIELDS``; for a numeric reference, also the flexible vote over
    ``candidates`` (each finished candidate's text and aggregated score). Runs math-verify: call it
    off the event loop."""
    result.answer = answer
    result.correct = answers_match(answer, result.reference)
    result.numeric = is_numeric(result.reference)
    if result.numeric and candidates:
        flexible = [answers.extract_final_number(text) for text, _ in candidates]
        result.flexible_answer = answers.choose(flexible, [score for _, score in candidates], voting)
        result.flexible_correct = answers_match(result.flexible_answer, result.reference)
    result.oracle = result.correct or any(
        answers_match(a, result.reference) for a in dict.fromkeys(a for a in candidate_answers if a.strip()))
    for name in STAT_FIELDS:
        setattr(result, name, getattr(stats, name))
    result.candidates = len(candidate_answers)
    return result


def result_from_json(row: dict[str, Any]) -> ProblemResult:
    names = {f.name for f in fields(ProblemResult)}
    return ProblemResult(**{k: v for k, v in row.items() if k in names})


@dataclass
class Summary:
    label: str
    method: str
    width: int
    overrides: dict[str, Any]
    problems: int
    errors: int
    correct: int
    accuracy: float          # correct / problems (a failed search counts as wrong)
    accuracy_ci_low: float   # 95% Wilson interval
    accuracy_ci_high: float
    answered: float          # share of searches that extracted an answer
    oracle_accuracy: float   # share where some finished candidate was right
    mean_total_kv_tokens: float
    mean_peak_kv_tokens: float
    max_peak_kv_tokens: int
    mean_generated_tokens: float
    cache_reuse: float       # cached / prompt tokens, over all searches
    kept_share: float        # candidates kept / offered, over all selections
    mean_wall_seconds: float
    generated_tokens_per_second: float  # generated tokens / summed search wall time


def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else 0.0


def by_configuration(results: Sequence[ProblemResult]) -> dict[tuple[str, int], list[ProblemResult]]:
    """Results grouped by configuration (label) and width, in the reports' order: width, then label."""
    groups: dict[tuple[str, int], list[ProblemResult]] = {}
    for r in results:
        groups.setdefault((r.label, r.width), []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])))


def summarise(results: Sequence[ProblemResult]) -> list[Summary]:
    """One Summary per (label, width), sorted by width, then label."""
    out = []
    for (label, width), rs in by_configuration(results).items():
        ok = [r for r in rs if not r.error]
        prompt = sum(r.prompt_tokens for r in ok)
        wall = sum(r.wall_seconds for r in ok)
        frontier = sum(r.frontier for r in ok)
        correct = sum(r.correct for r in rs)
        lo, hi = wilson_interval(correct, len(rs))
        out.append(Summary(
            label=label, method=rs[0].method, width=width, overrides=dict(rs[0].overrides),
            problems=len(rs), errors=len(rs) - len(ok), correct=correct,
            accuracy=correct / len(rs), accuracy_ci_low=lo, accuracy_ci_high=hi,
            answered=sum(bool(r.answer) for r in rs) / len(rs),
            oracle_accuracy=sum(r.oracle for r in rs) / len(rs),
            mean_total_kv_tokens=_mean([r.total_kv_tokens for r in ok]),
            mean_peak_kv_tokens=_mean([r.peak_kv_tokens for r in ok]),
            max_peak_kv_tokens=max((r.peak_kv_tokens for r in ok), default=0),
            mean_generated_tokens=_mean([r.generated_tokens for r in ok]),
            cache_reuse=sum(r.cached_prompt_tokens for r in ok) / prompt if prompt else 0.0,
            kept_share=sum(r.kept for r in ok) / frontier if frontier else 0.0,
            mean_wall_seconds=_mean([r.wall_seconds for r in ok]),
            generated_tokens_per_second=sum(r.generated_tokens for r in ok) / wall if wall else 0.0,
        ))
    return out


def compare_to_rebase(summaries: Sequence[Summary], results: Sequence[ProblemResult] = ()) -> list[dict[str, Any]]:
    """Each ETS configuration against REBASE at the same width: KV reduction (REBASE / ETS, mean
    total and mean peak), accuracy difference, whether ETS's accuracy lies within REBASE's 95%
    interval or above it, and whether the paper's goal (that, with >= 1.8x less total KV) holds.
    When per-problem results are given, only problems both finished are compared for KV."""
    out = []
    for width in sorted({s.width for s in summaries}):
        rebase = next((s for s in summaries if s.width == width and s.label == "rebase"), None)
        if rebase is None:
            continue
        for s in summaries:
            if s.width != width or s.method != "ets":
                continue
            ets_kv, rebase_kv = s.mean_total_kv_tokens, rebase.mean_total_kv_tokens
            ets_peak, rebase_peak = s.mean_peak_kv_tokens, rebase.mean_peak_kv_tokens
            if results:  # paired: the same problems under both
                mine = {r.id: r for r in results if r.label == s.label and r.width == width and not r.error}
                theirs = {r.id: r for r in results if r.label == "rebase" and r.width == width and not r.error}
                both = sorted(set(mine) & set(theirs))
                if both:
                    ets_kv = statistics.fmean(mine[i].total_kv_tokens for i in both)
                    rebase_kv = statistics.fmean(theirs[i].total_kv_tokens for i in both)
                    ets_peak = statistics.fmean(mine[i].peak_kv_tokens for i in both)
                    rebase_peak = statistics.fmean(theirs[i].peak_kv_tokens for i in both)
            reduction = rebase_kv / ets_kv if ets_kv else 0.0
            measured = accuracy_measured(s.correct, rebase.correct)
            matches = measured and s.accuracy >= rebase.accuracy_ci_low
            out.append({
                "width": width, "label": s.label,
                "kv_reduction_total": reduction,
                "kv_reduction_peak": rebase_peak / ets_peak if ets_peak else 0.0,
                "accuracy_delta": s.accuracy - rebase.accuracy,
                "accuracy_measured": measured,
                "accuracy_within_rebase_ci": matches,
                "goal_met": bool(matches and reduction >= KV_REDUCTION_GOAL),
            })
    return out


# ---- output -----------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_table(summaries: Sequence[Summary]) -> str:
    """Plain-text table for the terminal."""
    head = (f"{'method':<36} {'width':>5} {'n':>4} {'err':>3} {'acc':>6} {'95% CI':>13} {'answ':>6} {'oracle':>6} "
            f"{'KV total':>9} {'KV peak':>8} {'gen tok':>7} {'reuse':>6} {'kept':>6} {'wall s':>7}")
    rows = [head, "-" * len(head)]
    for s in summaries:
        ci = f"{100 * s.accuracy_ci_low:.0f}-{100 * s.accuracy_ci_high:.0f}%"
        rows.append(f"{s.label:<36} {s.width:>5} {s.problems:>4} {s.errors:>3} {_pct(s.accuracy):>6} {ci:>13} "
                    f"{_pct(s.answered):>6} {_pct(s.oracle_accuracy):>6} {s.mean_total_kv_tokens:>9.0f} "
                    f"{s.mean_peak_kv_tokens:>8.0f} {s.mean_generated_tokens:>7.0f} {_pct(s.cache_reuse):>6} "
                    f"{_pct(s.kept_share):>6} {s.mean_wall_seconds:>7.1f}")
    return "\n".join(rows)


def markdown_table(summaries: Sequence[Summary], comparisons: Sequence[dict[str, Any]] = ()) -> str:
    """The README / docs table (one row per configuration), then the ETS-vs-REBASE lines."""
    lines = [
        "| method | width | n | accuracy (95% CI) | answered | oracle | KV total (mean) | KV peak (mean) "
        "| generated tok | cache reuse | kept | wall s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        err = f" ({s.errors} failed)" if s.errors else ""
        lines.append(
            f"| {s.label} | {s.width} | {s.problems}{err} | {_pct(s.accuracy)} "
            f"({100 * s.accuracy_ci_low:.0f}-{100 * s.accuracy_ci_high:.0f}%) | {_pct(s.answered)} | "
            f"{_pct(s.oracle_accuracy)} | {s.mean_total_kv_tokens:.0f} | {s.mean_peak_kv_tokens:.0f} | "
            f"{s.mean_generated_tokens:.0f} | {_pct(s.cache_reuse)} | {_pct(s.kept_share)} | "
            f"{s.mean_wall_seconds:.1f} |")
    if comparisons:
        lines.append("")
        for c in comparisons:
            verdict = "goal met" if c["goal_met"] else "goal not met"
            within = ("not measured: neither right on any problem" if not c["accuracy_measured"]
                      else "within or above REBASE's interval" if c["accuracy_within_rebase_ci"]
                      else "below REBASE's interval")
            lines.append(
                f"- width {c['width']}, {c['label']}: REBASE/ETS KV total {c['kv_reduction_total']:.2f}x, "
                f"peak {c['kv_reduction_peak']:.2f}x; accuracy {100 * c['accuracy_delta']:+.1f} points "
                f"({within}): {verdict} (>= {KV_REDUCTION_GOAL}x at REBASE's accuracy)")
    return "\n".join(lines)


def _figure(size: tuple[float, float]) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size)


def _save(fig: Any, ax: Any, path: str | Path, title: str) -> None:
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(summaries: Sequence[Summary], path: str | Path, title: str = "") -> None:
    """Accuracy (with its 95% Wilson interval) against mean total logical KV tokens: one line per
    configuration (method, or ETS at one setting) through its widths, each point labelled with
    its width (the paper's accuracy-vs-KV figure)."""
    fig, ax = _figure((7.5, 5))
    for label in sorted({s.label for s in summaries}):
        pts = sorted((s for s in summaries if s.label == label), key=lambda s: s.width)
        xs = [s.mean_total_kv_tokens for s in pts]
        ys = [100 * s.accuracy for s in pts]
        err = [[100 * (s.accuracy - s.accuracy_ci_low) for s in pts],
               [100 * (s.accuracy_ci_high - s.accuracy) for s in pts]]
        short = label if not pts[0].overrides else pts[0].method + "[" + ",".join(
            f"{_abbrev(k)}{fmt_value(v)}" for k, v in pts[0].overrides.items()) + "]"
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"{short} (n={pts[0].problems})", alpha=0.85)
        for s, x, y in zip(pts, xs, ys, strict=True):
            ax.annotate(f"w{s.width}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("mean total KV tokens per search (logical, sum over selections)")
    ax.set_ylabel("accuracy (%), 95% Wilson interval")
    _save(fig, ax, path, title or "accuracy vs KV cache size")


def plot_kv_ratio(comparisons: Sequence[dict[str, Any]], path: str | Path, title: str = "",
                  goals: Sequence[float] = (1.8, 2.0)) -> None:
    """REBASE/configuration logical KV (geometric mean over problems, 95% bootstrap interval)
    against width, one line per ETS setting; the goals as horizontal lines."""
    fig, ax = _figure((7, 4.5))
    rows = [c for c in comparisons if c.get("problems") and c["method"] == "ets"]
    for label in sorted({c["label"] for c in rows}):
        pts = sorted((c for c in rows if c["label"] == label), key=lambda c: c["width"])
        xs = [c["width"] for c in pts]
        ys = [c["kv_ratio_total"] for c in pts]
        err = [[y - c["kv_ratio_total_ci"][0] for c, y in zip(pts, ys, strict=True)],
               [c["kv_ratio_total_ci"][1] - y for c, y in zip(pts, ys, strict=True)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, alpha=0.85,
                    label=f"{label} (n={'/'.join(str(c['problems']) for c in pts)})")
    for g, style in zip(goals, (":", "--"), strict=False):
        ax.axhline(g, color="grey", linestyle=style, linewidth=1, label=f"{g}x")
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width")
    ax.set_ylabel("REBASE / ETS logical KV (geometric mean, 95% bootstrap)")
    _save(fig, ax, path, title or "KV saving against width (paired)")


def paired_markdown(comparisons: Sequence[dict[str, Any]]) -> str:
    """The paired table: per configuration and width against REBASE on the same problems."""
    lines = [
        "| configuration | width | n | REBASE/ETS KV total (95% CI) | peak (95% CI) | accuracy (95% CI) "
        "| REBASE accuracy (95% CI) | difference (95% CI) | discordant (this/REBASE) | McNemar p "
        "| identical trees | goal line |",
        "|---|---:|---:|---|---|---|---|---|---:|---:|---:|---|",
    ]

    def ci(v: float, pair: Sequence[float]) -> str:
        return f"{v:.2f}x ({pair[0]:.2f}-{pair[1]:.2f})"

    def acc(v: float, pair: Sequence[float]) -> str:
        return f"{100 * v:.1f}% ({100 * pair[0]:.0f}-{100 * pair[1]:.0f}%)"

    for c in comparisons:
        if not c.get("problems"):
            continue
        d = c["discordant"]
        name = c["label"] if c.get("reference", "rebase") == "rebase" else f"{c['label']} vs {c['reference']}"
        lines.append(
            f"| {name} | {c['width']} | {c['problems']} | {ci(c['kv_ratio_total'], c['kv_ratio_total_ci'])} "
            f"| {ci(c['kv_ratio_peak'], c['kv_ratio_peak_ci'])} | {acc(c['accuracy'], c['accuracy_ci'])} "
            f"| {acc(c['reference_accuracy'], c['reference_accuracy_ci'])} "
            f"| {100 * c['accuracy_difference']:+.1f} ({100 * c['accuracy_difference_ci'][0]:+.0f} to "
            f"{100 * c['accuracy_difference_ci'][1]:+.0f}) | {d['only_this']}/{d['only_reference']} "
            f"| {c['mcnemar_p']:.2f} | {c['identical_trees']}/{c['problems']} | {c['verdict']} |")
    return "\n".join(lines)


def early_stop_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The early-stop table: per early-stopped configuration and width against its full search."""
    lines = [
        "| configuration | width | n | stopped early | width left (mean) | same answer where stopped "
        "| generated tokens saved | logical KV saved | samples requested saved | drawn by early runs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pct(d: dict[str, float]) -> str:
        return f"{d['saved']:.0f} of {d['full']:.0f} ({100 * d['saved_share']:.1f}%)"

    for r in rows:
        if not r.get("problems"):
            continue
        lines.append(
            f"| {r['label']} | {r['width']} | {r['problems']} | {r['stopped']} | {r['width_left_mean']:.1f} "
            f"| {r['same_answer_where_stopped']}/{r['stopped']} | {pct(r['generated_tokens'])} "
            f"| {pct(r['total_kv_tokens'])} | {pct(r['samples_requested'])} | {r['drawn_by_early']} |")
    return "\n".join(lines)


def _abbrev(name: str) -> str:
    return {"lambda_c": "c", "lambda_s": "s", "cluster_distance": "d", "softmax_temperature": "T",
            "node_cost": "cost:"}.get(name, name)


def read_jsonl(path: Path) -> list[ProblemResult]:
    """Results already written (a cut-off last line is ignored)."""
    out: list[ProblemResult] = []
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            out.append(result_from_json(json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue
    return out


def extraction_rows(results: Sequence[ProblemResult]) -> list[dict[str, Any]]:
    """Strict against flexible extraction per configuration, over its numeric problems (none: []):
    accuracy of each with its Wilson interval, how often each found an answer, and the searches
    only one of them got right (the paired difference; ``ets.evaluation.stats`` adds its test)."""
    out = []
    for (label, width), rs in by_configuration(results).items():
        num = [r for r in rs if r.numeric]
        if not num:
            continue
        strict, flexible = sum(r.correct for r in num), sum(r.flexible_correct for r in num)
        out.append({
            "label": label, "width": width, "problems": len(num),
            "strict_correct": strict, "strict_ci": list(wilson_interval(strict, len(num))),
            "flexible_correct": flexible, "flexible_ci": list(wilson_interval(flexible, len(num))),
            "strict_answered": sum(bool(r.answer) for r in num),
            "flexible_answered": sum(bool(r.flexible_answer) for r in num),
            "only_strict": sum(1 for r in num if r.correct and not r.flexible_correct),
            "only_flexible": sum(1 for r in num if r.flexible_correct and not r.correct),
        })
    return out


def extraction_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The strict-vs-flexible table (numeric problems)."""
    lines = ["| configuration | width | n | strict (answer marker) | flexible (last number) | answered strict "
             "/ flexible | right only strict / only flexible |",
             "|---|---:|---:|---|---|---:|---:|"]

    def acc(k: int, n: int, ci: Sequence[float]) -> str:
        return f"{k}/{n} {_pct(k / n)} ({100 * ci[0]:.0f}-{100 * ci[1]:.0f}%)"

    for r in rows:
        n = r["problems"]
        lines.append(f"| {r['label']} | {r['width']} | {n} | {acc(r['strict_correct'], n, r['strict_ci'])} "
                     f"| {acc(r['flexible_correct'], n, r['flexible_ci'])} | {r['strict_answered']} / "
                     f"{r['flexible_answered']} | {r['only_strict']} / {r['only_flexible']} |")
    return "\n".join(lines)
