"""ETS selection: the integer program against exhaustive enumeration, and its properties.

The reference objective below is written from the spec, independently of ``ets.search.ets``:
sum of normalised REBASE outcomes of kept candidates, minus lambda_c times the cost of every
retained node (kept leaves and each distinct ancestor once), plus lambda_s / K per covered cluster.
"""
from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest

from ets.search.base import Selection
from ets.search.clustering import cluster_steps, coverage_applies
from ets.search.ets import (
    FORMULATIONS, build_instance, build_program, cluster_labels, select_ets, solve_highs,
)
from ets.search.rebase import rebase_allocation
from ets.search.tree import Frontier
from ets.testing.frontiers import grown_frontier, small_frontier

T = 0.2


def spec_objective(
    f: Frontier, width: int, lambda_c: float, lambda_s: float, node_cost: str,
    labels: np.ndarray | None, keep: tuple[int, ...],
) -> float:
    n = f.size
    counts = rebase_allocation(f.scores, width, T)
    outcome = counts / counts.sum()
    ancestors = {j for path in f.ancestors for j in path}
    if node_cost == "uniform":
        leaf_cost = [lambda_c / (len(ancestors) + n)] * n
        anc_cost = {j: lambda_c / (len(ancestors) + n) for j in ancestors}
    else:
        tree = sum(f.candidate_tokens) + sum(f.node_tokens[j] for j in ancestors)
        leaf_cost = [lambda_c * t / tree for t in f.candidate_tokens]
        anc_cost = {j: lambda_c * f.node_tokens[j] / tree for j in ancestors}
    kept = [i for i in range(n) if keep[i]]
    value = sum(outcome[i] - leaf_cost[i] for i in kept)
    value -= sum(anc_cost[j] for j in {j for i in kept for j in f.ancestors[i]})
    if labels is not None:
        k = len(set(labels.tolist()))
        value += lambda_s / k * len({int(labels[i]) for i in kept})
    return float(value)


def brute_force(f: Frontier, width: int, lambda_c: float, lambda_s: float, node_cost: str,
                labels: np.ndarray | None) -> float:
    return max(
        spec_objective(f, width, lambda_c, lambda_s, node_cost, labels, keep)
        for keep in itertools.product((0, 1), repeat=f.size) if any(keep)
    )


CASES = [
    (seed, lc, ls, cost)
    for seed in range(12)
    for lc, ls in [(1.0, 1.5), (5.0, 1.45), (0.3, 0.0), (2.0, 4.0)]
    for cost in ("uniform", "tokens")
]


@pytest.mark.parametrize("seed,lambda_c,lambda_s,node_cost", CASES)
def test_solver_objective_equals_exhaustive_enumeration(seed: int, lambda_c: float, lambda_s: float,
                                                        node_cost: str) -> None:
    rng = np.random.default_rng(1000 + seed)
    for _ in range(3):
        n = int(rng.integers(2, 11))
        width = int(rng.choice([n, 16, 64]))
        f = small_frontier(rng, n)
        labels = cluster_labels(f, lambda_s, 0.05)
        best = brute_force(f, width, lambda_c, lambda_s, node_cost, labels)
        inst = build_instance(f, width, T, lambda_c, lambda_s, node_cost, labels)
        for formulation, lp_first in [(f, True) for f in FORMULATIONS] + [("compact", False), ("naive", False)]:
            solved = solve_highs(build_program(inst, formulation), time_limit_s=10.0, lp_first=lp_first)
            assert solved.status == "optimal" and solved.keep is not None
            got = spec_objective(f, width, lambda_c, lambda_s, node_cost, labels, tuple(solved.keep))
            assert got == pytest.approx(best, abs=1e-9), (formulation, lp_first)
            # The program's own value (constant folded in) agrees with the spec's objective.
            assert solved.objective == pytest.approx(best, abs=1e-7), (formulation, lp_first)
        sel = select_ets(f, width, softmax_temperature=T, lambda_c=lambda_c, lambda_s=lambda_s,
                         cluster_distance=0.05, node_cost=node_cost, time_limit_s=10.0)
        assert sel.solver_status == "optimal"
        assert sel.objective == pytest.approx(best, abs=1e-9)


def _forked(scores: list[float], node_tokens: tuple[int, int, int], candidate_tokens: tuple[int, int, int],
            step_texts: tuple[str, str, str], embeddings: np.ndarray | None = None) -> Frontier:
    """The tree of the hand-worked cases below: root 0 -> node 1 -> candidates 0 and 1, root ->
    node 2 -> candidate 2; ``node_tokens`` are the tokens of nodes 0, 1, 2."""
    return Frontier(scores=np.array(scores), ancestors=((0, 1), (0, 1), (0, 2)),
                    node_tokens=dict(enumerate(node_tokens)), candidate_tokens=candidate_tokens,
                    step_texts=step_texts, embeddings=embeddings)


def _select(f: Frontier, width: int, **kw: Any) -> Selection:
    args: dict[str, Any] = dict(softmax_temperature=T, lambda_c=1.0, lambda_s=1.5, cluster_distance=0.05,
                node_cost="uniform", time_limit_s=10.0)
    args.update(kw)
    return select_ets(f, width, **args)


@pytest.mark.parametrize("seed", range(15))
def test_counts_respect_width_and_pruning(seed: int) -> None:
    rng = np.random.default_rng(seed)
    width = int(rng.choice([4, 16, 64]))
    f = grown_frontier(rng, width, depths=int(rng.integers(1, 5)), dim=32)
    remaining = int(rng.integers(1, width + 1))  # some width already spent by finished nodes
    for lc in (0.5, 1.0, 5.0, 20.0):
        sel = _select(f, remaining, lambda_c=lc, node_cost=str(rng.choice(["uniform", "tokens"])))
        counts = np.array(sel.counts)
        assert counts.sum() <= remaining and (counts >= 0).all()
        assert len(counts) == f.size
        # A pruned candidate gets nothing; the counts are REBASE over exactly the kept set.
        keep = np.array(sel.keep)
        assert (counts[~keep] == 0).all()
        assert counts.tolist() == rebase_allocation(f.scores, remaining, T, keep=keep).tolist()


@pytest.mark.parametrize("seed", range(10))
def test_zero_lambdas_keep_what_rebase_keeps(seed: int) -> None:
    """lambda_c = lambda_s = 0: every term is non-decreasing in x, so keeping all is optimal and
    ETS is plain REBASE. Checked through select_ets and through the solver on the program itself
    (whose optimum must then be sum(O) = 1, i.e. nothing lost by keeping all)."""
    rng = np.random.default_rng(seed)
    f = grown_frontier(rng, 16, depths=3, dim=32)
    sel = _select(f, 16, lambda_c=0.0, lambda_s=0.0)
    assert sel.counts == tuple(rebase_allocation(f.scores, 16, T).tolist())
    inst = build_instance(f, 16, T, 0.0, 0.0, "uniform", None)
    solved = solve_highs(build_program(inst), 10.0)
    assert solved.objective == pytest.approx(1.0)
    assert inst.objective(np.ones(f.size, bool)) == pytest.approx(1.0)


def _kv_of_optimum(f: Frontier, width: int, lc: float, ls: float, cost: str, labels: Any) -> tuple[int, int]:
    inst = build_instance(f, width, T, lc, ls, cost, labels)
    solved = solve_highs(build_program(inst), 10.0)
    assert solved.status == "optimal"
    keep = solved.keep
    assert keep is not None
    nodes = int(keep.sum()) + len({j for i in np.flatnonzero(keep) for j in f.ancestors[i]})
    return f.kv_tokens(keep), nodes


@pytest.mark.parametrize("seed", range(25))
def test_raising_lambda_c_never_raises_what_the_cost_counts(seed: int) -> None:
    """Exact statement: for optima S1 at lambda1 < lambda2 and S2 at lambda2, adding
    F(S1) - l1 C(S1) >= F(S2) - l1 C(S2) and F(S2) - l2 C(S2) >= F(S1) - l2 C(S1) gives
    (l2 - l1)(C(S1) - C(S2)) >= 0, so C(S2) <= C(S1) for ANY choice among tied optima, where C is
    what the cost term counts. With node_cost="tokens", C is the kept set's logical KV tokens, so
    KV tokens never rise. With the uniform cost, C is the number of retained nodes: the node
    count never rises, but KV tokens can (see the next test). Only lambda_c varies (O and coverage
    do not depend on it); the solver runs at a 1e-9 gap, so its optima are exact here."""
    rng = np.random.default_rng(500 + seed)
    f = grown_frontier(rng, int(rng.choice([8, 16, 32])), depths=3, dim=32)
    ls = float(rng.choice([0.0, 1.5]))
    labels = cluster_labels(f, ls, 0.05)
    lambdas = [0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 50.0]
    width = 16
    kv_tok = [_kv_of_optimum(f, width, lc, ls, "tokens", labels)[0] for lc in lambdas]
    assert all(b <= a for a, b in itertools.pairwise(kv_tok)), kv_tok
    nodes_uni = [_kv_of_optimum(f, width, lc, ls, "uniform", labels)[1] for lc in lambdas]
    assert all(b <= a for a, b in itertools.pairwise(nodes_uni)), nodes_uni


def test_uniform_cost_can_trade_few_long_nodes_for_more_short_ones() -> None:
    """Counterexample to "KV tokens never rise" under the uniform cost (why the property above
    is stated per cost). root(10 tok) -> p(1) -> {a(1), b(1)}; root -> q(100) -> c(100).
    Scores a = b = 0.79, c = 0.8, width 25, T 0.2: REBASE gives c 9, a 8, b 8 (O = .36, .32, .32).
    Unit cost kappa = lambda_c / (M + N) = lambda_c / 6. At lambda_c 1.5 (kappa .25) the best set is
    {a, b}: .64 - 3 * .25 = -.11 (p, a, b) beats {c}: .36 - .5 = -.14 and {a, b, c}: 1 - 1.25 = -.25.
    At lambda_c 1.8 (kappa .3): {c}: .36 - .6 = -.24 beats {a, b}: .64 - .9 = -.26, {a}: -.28.
    (The root, retained by every set, costs one more kappa: objectives -.36 and -.54.)
    Fewer nodes (3 -> 2 besides the root), but KV tokens 13 -> 210."""
    f = _forked([0.79, 0.79, 0.8], node_tokens=(10, 1, 100), candidate_tokens=(1, 1, 100),
                step_texts=("a", "b", "c"))
    assert rebase_allocation(f.scores, 25, T).tolist() == [8, 8, 9]
    low = _select(f, 25, lambda_c=1.5, lambda_s=0.0)
    high = _select(f, 25, lambda_c=1.8, lambda_s=0.0)
    assert low.keep == (True, True, False) and high.keep == (False, False, True)
    assert f.kv_tokens(low.keep) == 13 and f.kv_tokens(high.keep) == 210
    assert low.objective == pytest.approx(-0.36) and high.objective == pytest.approx(-0.54)
    # The token-weighted cost prefers the cheap branch at both weights.
    for lc in (1.5, 1.8):
        keep = _select(f, 25, lambda_c=lc, lambda_s=0.0, node_cost="tokens").keep
        assert keep is not None and keep[2] is False


def test_no_incumbent_in_time_falls_back_to_rebase() -> None:
    f = grown_frontier(np.random.default_rng(3), 256, dim=64)
    sel = select_ets(f, 256, softmax_temperature=T, lambda_c=5.0, lambda_s=1.45, cluster_distance=0.05,
                     time_limit_s=1e-9, warm_start=False)
    assert sel.fell_back and sel.solver_status == "fallback"
    assert sel.counts == tuple(rebase_allocation(f.scores, 256, T).tolist())


def test_time_limit_keeps_the_best_incumbent() -> None:
    """Whatever status the limit leaves, the result is a valid allocation no worse than REBASE's
    own keep-set (the warm start), and 'optimal' only when the solver proved it."""
    f = grown_frontier(np.random.default_rng(4), 256, dim=64)
    inst = build_instance(f, 256, T, 5.0, 1.45, "uniform", cluster_labels(f, 1.45, 0.05))
    start_value = inst.objective(inst.outcome > 0)
    for limit in (1e-3, 5e-3, 10.0):
        sel = select_ets(f, 256, softmax_temperature=T, lambda_c=5.0, lambda_s=1.45, cluster_distance=0.05,
                         time_limit_s=limit)
        assert sel.solver_status in ("optimal", "time_limit", "fallback")
        assert sum(sel.counts) <= 256
        if sel.solver_status != "fallback":
            assert sel.objective is not None and sel.objective >= start_value - 1e-9
    assert sel.solver_status == "optimal"


def test_single_candidate_and_empty() -> None:
    f = Frontier(scores=np.array([0.3]), ancestors=((0,),), node_tokens={0: 5}, candidate_tokens=(3,),
                 step_texts=("x",))
    sel = _select(f, 7)
    assert sel.counts == (7,) and sel.solver_status == "trivial"


def test_coverage_needs_embeddings() -> None:
    f = grown_frontier(np.random.default_rng(0), 8, depths=2, dim=8)
    f = Frontier(f.scores, f.ancestors, f.node_tokens, f.candidate_tokens, f.step_texts, None)
    with pytest.raises(ValueError, match="embeddings"):
        _select(f, 8)
    # No coverage term (lambda_s = 0): embeddings are not needed.
    assert sum(_select(f, 8, lambda_s=0.0).counts) == 8


def test_clustering_and_when_coverage_is_skipped() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 32))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    near = base[[0, 0, 1, 2, 1]] + 1e-3 * rng.standard_normal((5, 32))
    labels = cluster_steps(near, 0.05)
    assert labels.tolist() == [0, 0, 1, 2, 1]
    # Orthogonal-ish vectors are never merged at the 0.05 cut; at distance 2 everything merges.
    assert len(set(cluster_steps(base, 0.05).tolist())) == 3
    assert set(cluster_steps(base, 2.0).tolist()) == {0}
    assert not coverage_applies(0.0, ["a", "b"])
    assert not coverage_applies(1.5, ["a"])
    assert not coverage_applies(1.5, ["same", "same", "same"])
    assert coverage_applies(1.5, ["a", "b"])


def test_coverage_keeps_a_distinct_low_scorer() -> None:
    """A heavily weighted coverage term keeps a lone candidate of its own cluster even though
    REBASE would give it nothing; with lambda_s = 0 it is pruned."""
    f = _forked([0.9, 0.89, 0.1], node_tokens=(10, 5, 5), candidate_tokens=(5, 5, 5),
                step_texts=("x = 1", "x = 1", "y = 2"), embeddings=np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    assert rebase_allocation(f.scores, 4, T)[2] == 0
    keep = _select(f, 4, lambda_c=1.0, lambda_s=0.0).keep
    assert keep is not None and keep[2] is False
    covered = _select(f, 4, lambda_c=1.0, lambda_s=3.0)
    assert covered.keep is not None and covered.keep[2] is True and covered.clusters == 2
    assert math.isclose(sum(covered.counts), 4)


@pytest.mark.parametrize("seed", range(6))
def test_component_split_clustering_equals_scipy_fcluster(seed: int) -> None:
    """cluster_steps runs linkage per connected component of the <= t graph (exact for average
    linkage); its partition must equal scipy's fcluster over the whole linkage on pdist."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    rng = np.random.default_rng(seed)
    for _ in range(20):
        n, k, d = int(rng.integers(2, 60)), int(rng.integers(1, 12)), int(rng.integers(2, 12))
        emb = rng.standard_normal((k, d))[rng.integers(0, k, n)]
        emb += float(rng.choice([0.01, 0.1, 0.3])) * rng.standard_normal((n, d))
        for cut in (0.05, 0.2, 0.6):
            ref = fcluster(linkage(pdist(emb, "cosine"), "average"), cut, "distance")
            got = cluster_steps(emb, cut)
            pairs = set(zip(ref.tolist(), got.tolist(), strict=True))
            assert len(pairs) == len(set(ref.tolist())) == len(set(got.tolist()))
            assert got[0] == 0 and set(got.tolist()) == set(range(got.max() + 1))


@pytest.mark.parametrize("lambda_c,node_cost", [(1.0, "uniform"), (5.0, "uniform"), (5.0, "tokens")])
def test_formulations_agree_on_realistic_frontiers(lambda_c: float, node_cost: str) -> None:
    """Beyond exhaustive reach (width 64, ~64 candidates): every formulation, with and without
    the LP-first path, reaches the same optimum as the spec's naive program solved as a MIP."""
    rng = np.random.default_rng(77)
    for _ in range(4):
        f = grown_frontier(rng, 64, depths=4, dim=32)
        inst = build_instance(f, 64, T, lambda_c, 1.4, node_cost, cluster_labels(f, 1.4, 0.05))
        ref = solve_highs(build_program(inst, "naive"), 30.0, lp_first=False)
        assert ref.status == "optimal"
        for formulation in FORMULATIONS:
            for lp_first in (True, False):
                got = solve_highs(build_program(inst, formulation), 30.0, lp_first=lp_first)
                assert got.status == "optimal" and got.keep is not None and ref.keep is not None
                assert inst.objective(got.keep) == pytest.approx(inst.objective(ref.keep), abs=1e-9)
