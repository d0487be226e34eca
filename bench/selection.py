"""Selection-time benchmark: REBASE vs ETS (clustering + integer program), and the same ETS
program solved by PuLP's bundled CBC subprocess as the reference implementation does.

For each width (16, 64, 256, 1024) and each weighting (the paper's lambdas; lambda_c = 5, the
heavy-tail case) it draws >= 50 realistic frontiers (a tree grown by a few REBASE depths, random
scores and step lengths, random unit embeddings with ~30% near-duplicate steps) and times, per
frontier and on the identical instance:

* ``rebase``: the REBASE allocation;
* ``ets``: the full ETS selection as the search runs it (clustering, compact program, LP-first
  HiGHS in-process, REBASE over the kept set);
* program variants on HiGHS (build + solve, clustering excluded): ``naive`` (the spec's rows,
  all binary) and ``compact`` with ``lp_first`` off. (The ablation of the compact formulation's
  ideas, ``-nomerge``, ``-leaflinks``, ``-nodown``, ``-plaincover``, is in the committed
  bench/results/selection.json from before those switches left the product; docs/benchmarks.md.)
* ``cbc``: clustering + the naive program built in PuLP and solved by ``PULP_CBC_CMD`` (one
  subprocess per call), checking that it reaches the same objective as ours (mismatches listed).

Wall-clock times (perf_counter) and, for in-process work, CPU times (process_time) are reported:
on a shared machine the CPU time is the steadier number. The machine's load average is recorded.
Results go to bench/results/selection[-quick].json and a markdown table is printed.

    .venv/bin/python bench/selection.py            # full run (a few minutes)
    .venv/bin/python bench/selection.py --quick    # smoke run (seconds)
"""
from __future__ import annotations

import os

# One BLAS thread: selection is a small single-request computation, and on a loaded 2-core box
# OpenBLAS's thread pool turns a 1 ms matrix product into tens of ms. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from functools import partial
from typing import Any, Callable

import numpy as np
import pulp

from ets.search.config import preset_lambda_s
from ets.search.ets import Program, Solved, build_instance, build_program, cluster_labels, select_ets, solve_highs
from ets.search.rebase import rebase_allocation, select_rebase
from ets.testing.frontiers import grown_frontier

T = 0.2
CUT = 0.05
# (label, formulation, lp_first): the spec's rows, then the compact formulation without and with LP first.
VARIANTS = [
    ("naive", "naive", True),
    ("naive (MIP only)", "naive", False),
    ("compact (MIP only)", "compact", False),
    ("compact", "compact", True),
]


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def _solve_variant(inst: Any, formulation: str, lp_first: bool, time_limit_s: float) -> tuple[Any, Any]:
    prog = build_program(inst, formulation)
    return prog, solve_highs(prog, time_limit_s, (inst.outcome > 0).astype(float), lp_first=lp_first)


def to_pulp(prog: Program, name: str = "ets") -> tuple[Any, list[Any]]:
    """The same program as a PuLP model: the reference formulation, for the CBC comparison."""
    model = pulp.LpProblem(name, pulp.LpMaximize)
    cols = [
        pulp.LpVariable(f"v{k}", lowBound=float(prog.col_lower[k]), upBound=float(prog.col_upper[k]),
                        cat=pulp.LpBinary if prog.integer[k] else pulp.LpContinuous)
        for k in range(prog.num_vars)
    ]
    model += pulp.lpSum(float(c) * v for c, v in zip(prog.objective, cols, strict=True) if c != 0) + prog.constant
    a = prog.matrix.tocsr()
    for r in range(prog.num_rows):
        s, e = a.indptr[r], a.indptr[r + 1]
        expr = pulp.lpSum(float(val) * cols[c] for c, val in zip(a.indices[s:e], a.data[s:e], strict=True))
        lo, hi = prog.row_lower[r], prog.row_upper[r]
        if math.isfinite(lo):
            model += expr >= float(lo)
        if math.isfinite(hi):
            model += expr <= float(hi)
    return model, cols


def solve_cbc(prog: Program, time_limit_s: float | None = None) -> Solved:
    """Solve with PuLP's bundled CBC (one subprocess per call, as the reference does)."""
    t0 = time.perf_counter()
    model, cols = to_pulp(prog)
    solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=0.0)
    model.solve(solver)
    seconds = time.perf_counter() - t0
    if pulp.LpStatus[model.status] != "Optimal" or cols[0].varValue is None:
        return Solved(None, pulp.LpStatus[model.status], None, seconds)
    x = np.array([(v.varValue or 0.0) > 0.5 for v in cols[: prog.n_leaves]])
    return Solved(x, "optimal", float(pulp.value(model.objective)), seconds)


def _stats(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1e3
    return {"median_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max()),
            "mean_ms": float(a.mean())}


def run_case(width: int, lambda_c: float, lambda_s: float, n_frontiers: int, cbc_frontiers: int,
             time_limit_s: float, seed: int, variants: bool, variant_frontiers: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    frontiers = [grown_frontier(rng, width, depths=4) for _ in range(n_frontiers)]
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    statuses: dict[str, int] = {}
    mismatches: list[dict[str, Any]] = []
    gaps: list[dict[str, Any]] = []
    kv_ratio: list[float] = []
    sizes: dict[str, list[int]] = {}

    def rec(name: str, w: float, c: float | None = None) -> None:
        wall.setdefault(name, []).append(w)
        if c is not None:
            cpu.setdefault(name, []).append(c)

    for k, f in enumerate(frontiers):
        _, w, c = _timed(partial(select_rebase, f.scores, width, T))
        rec("rebase", w, c)
        sel, w, c = _timed(partial(select_ets, f, width, softmax_temperature=T, lambda_c=lambda_c,
                                   lambda_s=lambda_s, cluster_distance=CUT, time_limit_s=time_limit_s))
        rec("ets", w, c)
        statuses[sel.solver_status] = statuses.get(sel.solver_status, 0) + 1
        rebase_keep = rebase_allocation(f.scores, width, T) > 0
        ets_keep = np.array(sel.counts) > 0
        kv_ratio.append(f.kv_tokens(ets_keep) / f.kv_tokens(rebase_keep))

        labels, w_cl, c_cl = _timed(partial(cluster_labels, f, lambda_s, CUT))
        rec("clustering", w_cl, c_cl)
        inst = build_instance(f, width, T, lambda_c, lambda_s, "uniform", labels)
        ours = None
        if variants and k < variant_frontiers:
            for name, formulation, lp_first in VARIANTS:
                (prog, solved), w, c = _timed(partial(_solve_variant, inst, formulation, lp_first, time_limit_s))
                rec(f"program: {name}", w, c)
                sizes.setdefault(f"{name} vars", []).append(prog.num_vars)
                sizes.setdefault(f"{name} rows", []).append(prog.num_rows)
                if name == "compact":
                    ours = solved
        if k < cbc_frontiers:
            ref_prog = build_program(inst, "naive")
            ref, w, _ = _timed(partial(solve_cbc, ref_prog))
            rec("program: cbc (naive)", w)
            rec("cbc selection", w + w_cl)  # clustering + CBC program, as the reference runs it
            mine = inst.objective(np.array(sel.keep)) if sel.keep is not None else None
            theirs = None if ref.keep is None else inst.objective(ref.keep)
            entry = {"frontier": k, "ours": mine, "cbc": theirs, "cbc_status": ref.status,
                     "ours_status": sel.solver_status}
            # Only a proven optimum can mismatch; a time-limited incumbent (or a fallback, counted in
            # ets_status) may legitimately fall short - recorded as a gap.
            if sel.solver_status == "optimal":
                if theirs is None or mine is None or abs(theirs - mine) > 1e-6:
                    mismatches.append(entry)
            elif sel.solver_status == "time_limit" and theirs is not None and mine is not None:
                gaps.append(entry | {"gap": theirs - mine})
            if ours is not None and ours.status == "optimal" and ref.keep is not None:
                if abs(inst.objective(ours.keep) - inst.objective(ref.keep)) > 1e-6:
                    mismatches.append({"frontier": k, "variant": "compact", "ours": inst.objective(ours.keep),
                                       "cbc": inst.objective(ref.keep)})
    out: dict[str, Any] = {
        "width": width, "lambda_c": lambda_c, "lambda_s": lambda_s, "frontiers": n_frontiers,
        "cbc_frontiers": min(cbc_frontiers, n_frontiers),
        "variant_frontiers": min(variant_frontiers, n_frontiers) if variants else 0,
        "candidates_median": int(np.median([f.size for f in frontiers])),
        "wall": {k: _stats(v) for k, v in wall.items()},
        "cpu": {k: _stats(v) for k, v in cpu.items()},
        "ets_status": statuses,
        "objective_mismatches": mismatches,
        "time_limit_gaps": gaps,
        "kept_kv_vs_rebase_mean": float(np.mean(kv_ratio)),
        "program_size_median": {k: int(np.median(v)) for k, v in sizes.items()},
    }
    if "cbc selection" in wall:
        cbc = np.asarray(wall["cbc selection"])
        ets = np.asarray(wall["ets"][: len(cbc)])
        out["speedup_vs_cbc"] = {
            "median": float(np.median(cbc) / np.median(ets)),
            "p99": float(np.percentile(cbc, 99) / np.percentile(ets, 99)),
        }
    return out


def bounded_case(width: int, time_limit_s: float, n: int, seed: int) -> dict[str, Any]:
    """Selection time against the time limit over a sweep of lambda_c (any weighting)."""
    rng = np.random.default_rng(seed)
    frontiers = [grown_frontier(rng, width, depths=4) for _ in range(n)]
    rows = []
    for lc in (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0):
        times: list[float] = []
        cpu: list[float] = []
        statuses: dict[str, int] = {}
        for f in frontiers:
            sel, w, c = _timed(partial(select_ets, f, width, softmax_temperature=T, lambda_c=lc,
                                       lambda_s=preset_lambda_s(width), cluster_distance=CUT,
                                       time_limit_s=time_limit_s))
            times.append(w)
            cpu.append(c)
            statuses[sel.solver_status] = statuses.get(sel.solver_status, 0) + 1
        rows.append({"lambda_c": lc, "max_ms": max(times) * 1e3, "median_ms": statistics.median(times) * 1e3,
                     "cpu_max_ms": max(cpu) * 1e3, "status": statuses})
    return {"width": width, "time_limit_s": time_limit_s, "frontiers": n, "sweep": rows}


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| width | N | lambda_c | rebase median | ets median / p99 (wall) | ets median / p99 (CPU) | "
        "CBC median / p99 (wall) | speedup median / p99 | ETS statuses | objective mismatches | kept KV vs REBASE |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["cases"]:
        wl, cp = r["wall"], r["cpu"]
        cbc = wl.get("cbc selection")
        sp = r.get("speedup_vs_cbc")
        lines.append(
            f"| {r['width']} | {r['candidates_median']} | {r['lambda_c']:g} | {wl['rebase']['median_ms']:.2f} ms | "
            f"{wl['ets']['median_ms']:.1f} / {wl['ets']['p99_ms']:.1f} ms | "
            f"{cp['ets']['median_ms']:.1f} / {cp['ets']['p99_ms']:.1f} ms | "
            + (f"{cbc['median_ms']:.0f} / {cbc['p99_ms']:.0f} ms | {sp['median']:.1f}x / {sp['p99']:.1f}x | "
               if cbc else "- | - | ")
            + f"{r['ets_status']} | {len(r['objective_mismatches'])}/{r['cbc_frontiers']} | "
            f"{r['kept_kv_vs_rebase_mean']:.2f} |"
        )
    variant_rows = [r for r in results["cases"] if any(k.startswith("program: ") for k in r["cpu"])]
    if variant_rows:
        names = [k for k in variant_rows[0]["cpu"] if k.startswith("program: ")]
        lines += ["", "Program build + solve (clustering excluded), CPU median / p99 ms (vars x rows, median):", "",
                  "| width | lambda_c | " + " | ".join(n.removeprefix("program: ") for n in names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for r in variant_rows:
            cells = []
            for n in names:
                v = r["cpu"][n]
                base = n.removeprefix("program: ")
                size = r["program_size_median"]
                dims = f" ({size[base + ' vars']}x{size[base + ' rows']})" if base + " vars" in size else ""
                cells.append(f"{v['median_ms']:.1f} / {v['p99_ms']:.1f}{dims}")
            lines.append(f"| {r['width']} | {r['lambda_c']:g} | " + " | ".join(cells) + " |")
    b = results.get("bounded")
    if b:
        lines += ["", f"Time limit {b['time_limit_s'] * 1e3:.0f} ms, width {b['width']}, {b['frontiers']} frontiers: "
                  "max selection ms per lambda_c, wall (CPU): "
                  + ", ".join(f"{r['lambda_c']:g}: {r['max_ms']:.0f} ({r['cpu_max_ms']:.0f})" for r in b["sweep"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: widths 16 and 64, 4 frontiers")
    ap.add_argument("--widths", type=int, nargs="*", default=None)
    ap.add_argument("--frontiers", type=int, default=50)
    ap.add_argument("--cbc-frontiers", type=int, default=None,
                    help="frontiers per case also solved by CBC (default: all; 20 at width 1024)")
    ap.add_argument("--time-limit", type=float, default=0.5, help="ETS solver time limit, seconds")
    ap.add_argument("--bounded-limit", type=float, default=0.02, help="time limit of the lambda sweep, seconds")
    ap.add_argument("--no-variants", action="store_true", help="skip the formulation variants")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    widths = args.widths or ([16, 64] if args.quick else [16, 64, 256, 1024])
    n = 4 if args.quick else args.frontiers
    load_before = os.getloadavg()
    started = time.perf_counter()
    cases = []
    for width in widths:
        for lambda_c in (1.0, 5.0):
            # Width 1024: CBC and the slow variants on a subset keep the run to a few minutes.
            cbc_n = args.cbc_frontiers if args.cbc_frontiers is not None else (20 if width >= 1024 else n)
            r = run_case(width, lambda_c, preset_lambda_s(width), n, cbc_n, args.time_limit,
                         args.seed + width, variants=not args.no_variants,
                         variant_frontiers=10 if width >= 1024 else n)
            cases.append(r)
            print(f"width {width} lambda_c {lambda_c:g}: ets median {r['wall']['ets']['median_ms']:.1f} ms, "
                  f"cbc {r['wall'].get('cbc selection', {}).get('median_ms', float('nan')):.0f} ms, "
                  f"mismatches {len(r['objective_mismatches'])}", file=sys.stderr, flush=True)
    bounded = bounded_case(256 if not args.quick else 64, args.bounded_limit, 10 if not args.quick else 2,
                           args.seed + 7)
    results = {
        "command": "bench/selection.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "softmax_temperature": T, "cluster_distance": CUT, "time_limit_s": args.time_limit,
        "cases": cases, "bounded": bounded, "seconds": time.perf_counter() - started,
    }
    out = args.out or Path(__file__).parent / "results" / ("selection-quick.json" if args.quick else "selection.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    print(f"\nwrote {out} in {results['seconds']:.0f} s; load average before {load_before[0]:.1f}, "
          f"after {results['machine']['loadavg_after'][0]:.1f}")
    total_mismatches = sum(len(r["objective_mismatches"]) for r in cases)
    return 1 if total_mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
