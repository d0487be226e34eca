"""ETS selection: which candidates to keep (an integer program), then REBASE over the kept ones.

Owns the ETS instance (outcome values, node costs, clusters), its objective evaluated straight
from the definitions, the integer program as plain arrays in several formulations, the
in-process HiGHS solve (``highspy``; LP first, then MIP with a time limit and the best incumbent,
REBASE fallback when nothing feasible is found in time) and ``select_ets``. The reference's
solver (the same arrays built in PuLP and solved by its bundled CBC) is the benchmark's
(``bench/selection.py``), which compares the two on every frontier.

Program (spec): maximise sum_i O_i x_i - cost * (retained nodes) + lambda_s/K * sum_k c_k,
y_j >= x_i for leaf i under ancestor j, y_j <= sum of x under j, c_k <= sum of x in cluster k,
sum_i x_i >= 1. Formulations, all with the same optimum over x (tests check them against
exhaustive enumeration):

* ``naive``: the spec's rows verbatim, every variable binary (what the reference builds).
* ``compact`` (default), built from these ideas, each measured by bench/selection.py:
  - merge: ancestors with identical leaf sets (single-child chains) are one variable; an
    ancestor over every leaf is a constant (sum x >= 1 retains it); an ancestor over one leaf,
    and a singleton cluster, fold into that leaf's coefficient;
  - edge links: y_parent >= y_child along the tree instead of y_j >= x_i for every leaf below;
  - y and c continuous in [0, 1]: at an optimum they are max / min(1, sum) of integer x's;
  - down rows (y_g <= sum of its children, sum of top-level subtrees >= 1) and cluster covers by
    subtrees (c_k <= sum of y over subtrees covering the members): valid for every integer
    keep-set, they cut off the fractional vertices that appear when costs bind (two siblings at
    1/2 paying their shared parent half), so the LP relaxation is usually integral already;
  - LP first: if the relaxation's x are integral, that is a proven optimum and the MIP is skipped.
    The lean rows are solved first; the strengthening rows are added to the warm LP only when
    the lean LP is fractional (they cost ~20% in LP time when not needed).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import highspy
import numpy as np
import scipy.sparse as sp

from ets.search.base import Selection, SolverStatus
from ets.search.clustering import cluster_steps, coverage_applies
from ets.search.rebase import outcome_values, rebase_allocation
from ets.search.tree import Frontier


@dataclass(frozen=True)
class EtsInstance:
    """One ETS keep-decision: per-leaf outcome and cost, ancestor costs, clusters."""

    outcome: np.ndarray  # O_i, shape (N,)
    leaf_cost: np.ndarray  # cost of retaining candidate i's own node, shape (N,)
    ancestors: tuple[tuple[int, ...], ...]  # per leaf, ancestor node ids root first
    ancestor_cost: dict[int, float]  # cost of retaining ancestor node j
    clusters: np.ndarray | None  # cluster label per leaf (0..K-1), None = no coverage term
    cluster_weight: float  # lambda_s / K

    @property
    def size(self) -> int:
        return int(self.outcome.shape[0])

    @property
    def num_clusters(self) -> int:
        return 0 if self.clusters is None else int(self.clusters.max()) + 1

    def objective(self, keep: Sequence[bool] | np.ndarray) -> float:
        """The spec's objective of a keep-set, straight from the definitions."""
        mask = np.asarray(keep, dtype=bool)
        value = float(self.outcome[mask].sum() - self.leaf_cost[mask].sum())
        needed: set[int] = set()
        for i in np.flatnonzero(mask):
            needed.update(self.ancestors[i])
        value -= sum(self.ancestor_cost[j] for j in needed)
        if self.clusters is not None:
            value += self.cluster_weight * len(set(self.clusters[mask].tolist()))
        return value


def build_instance(
    frontier: Frontier, width: int, softmax_temperature: float, lambda_c: float, lambda_s: float,
    node_cost: str = "uniform", labels: np.ndarray | None = None,
) -> EtsInstance:
    """The ETS instance of a frontier. ``labels`` (cluster per candidate) enable coverage."""
    n = frontier.size
    anc_ids = frontier.ancestor_ids()
    if node_cost == "uniform":
        # Reference: lambda_c / (M + N) per retained node.
        unit = lambda_c / (len(anc_ids) + n)
        leaf_cost = np.full(n, unit)
        anc_cost = {j: unit for j in anc_ids}
    elif node_cost == "tokens":
        # Token-weighted: node tokens / tree tokens, i.e. lambda_c times the fraction of the
        # frontier's logical KV cache that the node occupies.
        total = frontier.tree_tokens()
        scale = lambda_c / total if total > 0 else 0.0
        leaf_cost = np.array(frontier.candidate_tokens, dtype=float) * scale
        anc_cost = {j: frontier.node_tokens[j] * scale for j in anc_ids}
    else:
        raise ValueError(f"node_cost: unknown {node_cost!r}")
    clusters = None
    weight = 0.0
    if labels is not None:
        clusters = np.asarray(labels, dtype=np.int64)
        weight = lambda_s / (int(clusters.max()) + 1)
    return EtsInstance(
        outcome=outcome_values(frontier.scores, width, softmax_temperature),
        leaf_cost=leaf_cost, ancestors=frontier.ancestors, ancestor_cost=anc_cost,
        clusters=clusters, cluster_weight=weight,
    )


# --------------------------------------------------------------------------------------------
# The program as arrays
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Program:
    """maximise objective @ v + constant  s.t.  row_lower <= A v <= row_upper, bounds, integrality.

    The first ``n_leaves`` variables are the x_i.
    """

    objective: np.ndarray
    constant: float
    col_lower: np.ndarray
    col_upper: np.ndarray
    integer: np.ndarray  # bool per variable
    matrix: sp.csc_matrix
    row_lower: np.ndarray
    row_upper: np.ndarray
    n_leaves: int
    formulation: str
    # Rows of the lean formulation (bool per row); the others only strengthen the LP relaxation.
    # None: every row is core.
    core_rows: np.ndarray | None = None

    @property
    def num_vars(self) -> int:
        return int(self.objective.shape[0])

    @property
    def num_rows(self) -> int:
        return int(self.row_lower.shape[0])

    def value(self, v: np.ndarray) -> float:
        return float(self.objective @ v + self.constant)


class _Rows:
    """Accumulates sparse rows lo <= sum(coef * var) <= hi."""

    def __init__(self) -> None:
        self.r: list[int] = []
        self.c: list[int] = []
        self.v: list[float] = []
        self.lo: list[float] = []
        self.hi: list[float] = []
        self.core: list[bool] = []

    def add(self, cols: Sequence[int], coefs: Sequence[float], lo: float, hi: float, core: bool = True) -> None:
        row = len(self.lo)
        self.core.append(core)
        self.r.extend([row] * len(cols))
        self.c.extend(cols)
        self.v.extend(coefs)
        self.lo.append(lo)
        self.hi.append(hi)

    def add_pairs(self, pairs: Sequence[tuple[int, int]], lo: float, hi: float) -> None:
        """Rows ``lo <= v[a] - v[b] <= hi`` for each (a, b)."""
        first = len(self.lo)
        for k, (a, b) in enumerate(pairs):
            self.r += (first + k, first + k)
            self.c += (a, b)
            self.v += (1.0, -1.0)
        self.lo += [lo] * len(pairs)
        self.hi += [hi] * len(pairs)
        self.core += [True] * len(pairs)

    def matrix(self, n_cols: int) -> sp.csc_matrix:
        return sp.csc_matrix((self.v, (self.r, self.c)), shape=(len(self.lo), n_cols))


# The product's formulation ("compact") and the spec's rows ("naive", the reference the tests and
# bench/selection.py hold it against). The ablation of the compact one's ideas (no merging, leaf
# links, no down rows, plain covers) was measured once (bench/results/selection.json,
# docs/benchmarks.md) and is not kept as switches in the product.
FORMULATIONS: tuple[str, ...] = ("compact", "naive")


def build_program(inst: EtsInstance, formulation: str = "compact") -> Program:
    if formulation == "naive":
        return _build_naive(inst)
    if formulation == "compact":
        return _build_compact(inst)
    raise ValueError(f"formulation: unknown {formulation!r}")


def _cluster_members(inst: EtsInstance) -> list[list[int]]:
    """Leaves of each cluster (in label order); empty when there is no coverage term."""
    if inst.clusters is None:
        return []
    order = np.argsort(inst.clusters, kind="stable")
    bounds = np.cumsum(np.bincount(inst.clusters, minlength=inst.num_clusters))[:-1]
    return [part.tolist() for part in np.split(order, bounds)]


def _build_naive(inst: EtsInstance) -> Program:
    n = inst.size
    anc_ids = sorted({j for path in inst.ancestors for j in path})
    col_of = {j: n + k for k, j in enumerate(anc_ids)}
    k_clusters = inst.num_clusters
    n_vars = n + len(anc_ids) + k_clusters
    obj = np.zeros(n_vars)
    obj[:n] = inst.outcome - inst.leaf_cost
    for j in anc_ids:
        obj[col_of[j]] = -inst.ancestor_cost[j]
    obj[n + len(anc_ids):] = inst.cluster_weight
    rows = _Rows()
    under: dict[int, list[int]] = {j: [] for j in anc_ids}
    for i, path in enumerate(inst.ancestors):
        for j in path:
            under[j].append(i)
            rows.add([col_of[j], i], [1.0, -1.0], 0.0, math.inf)  # y_j >= x_i
    for j in anc_ids:  # y_j <= sum of x under j
        rows.add([col_of[j]] + under[j], [1.0] + [-1.0] * len(under[j]), -math.inf, 0.0)
    for k, members in enumerate(_cluster_members(inst)):
        rows.add([n + len(anc_ids) + k] + members, [1.0] + [-1.0] * len(members), -math.inf, 0.0)
    rows.add(list(range(n)), [1.0] * n, 1.0, math.inf)
    return Program(
        objective=obj, constant=0.0, col_lower=np.zeros(n_vars), col_upper=np.ones(n_vars),
        integer=np.ones(n_vars, dtype=bool), matrix=rows.matrix(n_vars),
        row_lower=np.array(rows.lo), row_upper=np.array(rows.hi), n_leaves=n, formulation="naive",
    )


def _cluster_covers(
    members: list[int], chains: list[list[int]], group_leaves: list[list[int]], n: int
) -> list[list[int]]:
    """Covers of a cluster's members by subtrees, each giving a valid row c_k <= sum of the
    covering columns (a kept member makes every subtree above it have y = 1).

    The spec's row uses the members' own x. With the down rows (y_g <= sum of children) a cover
    by higher subtrees can be tighter: it cuts off fractional vertices where several members at
    1/2 cover the cluster fully while paying their shared ancestors only half. Returned: the
    cover by maximal subtrees whose leaves all belong to the cluster (at least as tight as the
    spec's row), and the covers by each member's ancestor ``level`` steps up (parents,
    grandparents, ...), deduplicated.
    """
    member_set = frozenset(members)
    covers: list[list[int]] = []

    def add(cover: set[int]) -> None:
        c = sorted(cover)
        if c not in covers:
            covers.append(c)

    pure: set[int] = set()
    for i in members:
        col = i
        for c in chains[i]:  # top first: the first pure column is the maximal one
            leaves = group_leaves[c - n]
            if len(leaves) <= len(member_set) and member_set.issuperset(leaves):
                col = c
                break
        pure.add(col)
    # A member under a pure column already in the cover needs no column of its own.
    add(pure)
    depth = max((len(chains[i]) for i in members), default=0)
    for level in range(1, depth + 1):
        add({chains[i][-level] if len(chains[i]) >= level else (chains[i][0] if chains[i] else i) for i in members})
    return covers


def _build_compact(inst: EtsInstance) -> Program:
    """The spec's program with three ideas that keep it small and its LP tight: ancestors with the
    same leaf set merge into one column (constants and single-leaf ancestors fold away), each
    variable links only to its children in the tree of variables, and valid "down" rows and
    subtree covers of the clusters cut off the LP's typical fractional vertices."""
    n = inst.size
    obj_x = inst.outcome - inst.leaf_cost
    constant = 0.0
    # Leaf set of every ancestor.
    leaves_of: dict[int, list[int]] = {}
    for i, path in enumerate(inst.ancestors):
        for j in path:
            leaves_of.setdefault(j, []).append(i)
    # Merge ancestors by identical leaf set; fold constants and single-leaf ancestors away.
    group_of_set: dict[tuple[int, ...], int] = {}
    group_cost: list[float] = []
    group_leaves: list[list[int]] = []
    var_of_anc: dict[int, int | None] = {}  # ancestor -> group index, None when folded away
    for j, leaves in leaves_of.items():
        cost = inst.ancestor_cost[j]
        if len(leaves) == n:
            constant -= cost  # retained by every non-empty keep-set
            var_of_anc[j] = None
            continue
        if len(leaves) == 1:
            obj_x[leaves[0]] -= cost  # retained exactly when that leaf is
            var_of_anc[j] = None
            continue
        key = tuple(leaves)
        g = group_of_set.get(key)
        if g is None:
            g = group_of_set[key] = len(group_cost)
            group_cost.append(0.0)
            group_leaves.append(leaves)
        group_cost[g] += cost
        var_of_anc[j] = g
    n_groups = len(group_cost)
    # Coverage: singleton clusters fold into their leaf; the others get a variable.
    cluster_cols = _cluster_members(inst)
    if inst.clusters is not None:
        singles = [m[0] for m in cluster_cols if len(m) == 1]
        obj_x[singles] += inst.cluster_weight
        cluster_cols = [m for m in cluster_cols if len(m) > 1]
    n_vars = n + n_groups + len(cluster_cols)
    obj = np.zeros(n_vars)
    obj[:n] = obj_x
    obj[n:n + n_groups] = -np.array(group_cost)
    obj[n + n_groups:] = inst.cluster_weight
    # The tree of variables: each leaf's path as a chain of group columns ending at x_i.
    edges: set[tuple[int, int]] = set()
    top: set[int] = set()
    chains: list[list[int]] = []  # per leaf: its group columns, top first
    for i, path in enumerate(inst.ancestors):
        prev: int | None = None
        chain: list[int] = []
        chains.append(chain)
        for j in path:  # leaf sets shrink down a path, so equal groups are contiguous
            g = var_of_anc[j]
            if g is None:
                continue
            col = n + g
            if prev is None:
                top.add(col)
            elif prev != col:
                edges.add((prev, col))
            if prev != col:
                chain.append(col)
            prev = col
        if prev is None:
            top.add(i)
        else:
            edges.add((prev, i))
    rows = _Rows()
    # y_parent - y_child >= 0 (or y - x_i >= 0), one two-entry row per edge of the variables' tree.
    rows.add_pairs(sorted(edges), 0.0, math.inf)
    # Down rows: valid for every closure y = max(children) of an integer keep-set, and they cut off
    # the typical fractional vertex: when sum(x) >= 1 binds, the LP would keep two sibling leaves
    # at 1/2 each and pay their shared ancestor only half. A kept node needs a kept child
    # (y_g <= sum of children) and some top-level subtree is kept (sum of tops >= 1).
    children: dict[int, list[int]] = {}
    for parent_col, child_col in edges:
        children.setdefault(parent_col, []).append(child_col)
    for parent_col in sorted(children):
        kids = sorted(children[parent_col])
        rows.add([parent_col] + kids, [1.0] + [-1.0] * len(kids), -math.inf, 0.0, core=False)
    tops = sorted(top)
    rows.add(tops, [1.0] * len(tops), 1.0, math.inf, core=False)
    for k, members in enumerate(cluster_cols):
        # The spec's row (members' own x) is core; subtree covers only strengthen.
        rows.add([n + n_groups + k] + members, [1.0] + [-1.0] * len(members), -math.inf, 0.0)
        for cover in _cluster_covers(members, chains, group_leaves, n):
            if cover != sorted(members):
                rows.add([n + n_groups + k] + cover, [1.0] + [-1.0] * len(cover), -math.inf, 0.0, core=False)
    rows.add(list(range(n)), [1.0] * n, 1.0, math.inf)
    integer = np.zeros(n_vars, dtype=bool)
    integer[:n] = True
    return Program(
        objective=obj, constant=constant, col_lower=np.zeros(n_vars), col_upper=np.ones(n_vars),
        integer=integer, matrix=rows.matrix(n_vars), row_lower=np.array(rows.lo),
        row_upper=np.array(rows.hi), n_leaves=n,
        formulation="compact",
        core_rows=np.array(rows.core, dtype=bool),
    )


# --------------------------------------------------------------------------------------------
# Solvers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Solved:
    keep: np.ndarray | None  # x as bools, None when no feasible solution was found
    status: str  # "optimal" | "time_limit" | "none" | "error: ..."
    objective: float | None  # the program's objective of ``keep`` (constant included)
    seconds: float


def _bounds(values: np.ndarray) -> np.ndarray:
    """Row bounds with infinities as HiGHS spells them."""
    out = np.array(values, dtype=np.float64)
    out[np.isposinf(out)] = highspy.kHighsInf
    out[np.isneginf(out)] = -highspy.kHighsInf
    return out


def _highs_lp(prog: Program, rows: np.ndarray | None = None) -> "highspy.HighsLp":
    """The program (or only the rows selected by the bool mask ``rows``) as a HiGHS model."""
    m = prog.matrix if rows is None else prog.matrix[rows]
    lo = prog.row_lower if rows is None else prog.row_lower[rows]
    hi = prog.row_upper if rows is None else prog.row_upper[rows]
    m = sp.csc_matrix(m)
    lp = highspy.HighsLp()
    lp.num_col_ = prog.num_vars
    lp.num_row_ = int(lo.shape[0])
    lp.col_cost_ = prog.objective
    lp.col_lower_ = prog.col_lower
    lp.col_upper_ = prog.col_upper
    lp.row_lower_ = _bounds(lo)
    lp.row_upper_ = _bounds(hi)
    lp.offset_ = prog.constant
    lp.sense_ = highspy.ObjSense.kMaximize
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = m.indptr
    lp.a_matrix_.index_ = m.indices
    lp.a_matrix_.value_ = m.data
    lp.a_matrix_.num_col_ = prog.num_vars
    lp.a_matrix_.num_row_ = int(lo.shape[0])
    lp.integrality_ = [
        highspy.HighsVarType.kInteger if b else highspy.HighsVarType.kContinuous for b in prog.integer
    ]
    return lp


def _add_rows(h: "highspy.Highs", prog: Program, rows: np.ndarray) -> None:
    """Add the program's rows selected by the bool mask ``rows`` to the model in ``h``."""
    extra = sp.csr_matrix(prog.matrix[rows])
    h.addRows(extra.shape[0], _bounds(prog.row_lower[rows]), _bounds(prog.row_upper[rows]),
              extra.nnz, extra.indptr[:-1].astype(np.int32), extra.indices.astype(np.int32), extra.data)


# An LP vertex whose x are within this of 0/1 is taken as integral.
_INTEGRAL_TOL = 1e-6


def solve_highs(
    prog: Program, time_limit_s: float, start: np.ndarray | None = None, gap: float = 1e-9,
    lp_first: bool = True,
) -> Solved:
    """Solve in-process with HiGHS; keep the best incumbent if the time limit hits.

    ``lp_first``: solve the LP relaxation first and stop there when its x are integral (then it
    is a proven MIP optimum: the relaxation's bound is attained). On the compact formulation this
    is the common case - without coverage the program is a max-weight closure on a tree, whose
    LP is integral - and it skips HiGHS's MIP root work (cuts, heuristics), several times the LP
    time. The LP goes in two stages: the lean rows (``core_rows``) first, then, only if that is
    fractional, the strengthening rows added to the warm model. ``start``: values of the x (a
    keep-set) to warm-start the MIP from.
    """
    t0 = time.perf_counter()
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    # One thread: a selection is small, the service runs searches concurrently, and HiGHS's
    # worker threads only contend with it for the cores.
    h.setOptionValue("threads", 1)
    # Objectives are O(1) sums of fractions: the default relative gap (1e-4) could stop short of
    # the true optimum, which the optimality tests would (rightly) catch.
    h.setOptionValue("mip_rel_gap", gap)
    h.setOptionValue("mip_abs_gap", gap)
    core = prog.core_rows if lp_first and prog.core_rows is not None and not prog.core_rows.all() else None
    if h.passModel(_highs_lp(prog, core)) == highspy.HighsStatus.kError:
        return Solved(None, "error: passModel", None, time.perf_counter() - t0)
    if lp_first:
        h.setOptionValue("solve_relaxation", True)
        # These LPs are small and sparse: presolve costs more than it saves (measured ~2x).
        h.setOptionValue("presolve", "off")
        stages = 2 if core is not None else 1
        for stage in range(stages):
            if stage == 1:
                assert core is not None  # two stages only with a core (above)
                # Lean LP fractional: add the strengthening rows; dual simplex re-optimises
                # from the current basis.
                _add_rows(h, prog, ~core)
            left = time_limit_s - (time.perf_counter() - t0)
            if left <= 0:
                return Solved(None, "none", None, time.perf_counter() - t0)
            h.setOptionValue("time_limit", float(left))
            h.run()
            if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
                continue
            x = np.asarray(h.getSolution().col_value)[: prog.n_leaves]
            if np.all(np.minimum(x, 1.0 - x) <= _INTEGRAL_TOL) and (x > 0.5).any():
                return Solved(x > 0.5, "optimal", float(h.getInfo().objective_function_value),
                              time.perf_counter() - t0)
        if core is not None and h.getNumRow() < prog.num_rows:  # the lean LP did not finish
            _add_rows(h, prog, ~core)
        h.setOptionValue("solve_relaxation", False)
        h.setOptionValue("presolve", "choose")
    left = time_limit_s - (time.perf_counter() - t0)
    if left <= 0:
        return Solved(None, "none", None, time.perf_counter() - t0)
    h.setOptionValue("time_limit", float(left))
    if start is not None:
        # A partial start (the x only): HiGHS completes the continuous part itself.
        idx = np.arange(prog.n_leaves, dtype=np.int32)
        h.setSolution(prog.n_leaves, idx, np.asarray(start, dtype=np.float64)[: prog.n_leaves])
    h.run()
    model_status = h.getModelStatus()
    info = h.getInfo()
    seconds = time.perf_counter() - t0
    has_solution = info.primal_solution_status == highspy.kSolutionStatusFeasible
    if not has_solution:
        return Solved(None, "none" if model_status == highspy.HighsModelStatus.kTimeLimit
                      else f"error: {h.modelStatusToString(model_status)}", None, seconds)
    x = np.asarray(h.getSolution().col_value[: prog.n_leaves]) > 0.5
    label = "optimal" if model_status == highspy.HighsModelStatus.kOptimal else "time_limit"
    return Solved(x, label, float(info.objective_function_value), seconds)


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def uses_coverage(step_texts: Sequence[str], lambda_c: float, lambda_s: float) -> bool:
    """Whether an ETS selection over candidates with these newest-step texts clusters them (and so
    needs their embeddings): not for one candidate or without node cost (``select_ets`` then skips
    the program), nor when the spec skips the coverage term."""
    return len(step_texts) > 1 and lambda_c > 0 and coverage_applies(lambda_s, step_texts)


def cluster_labels(frontier: Frontier, lambda_s: float, cluster_distance: float) -> np.ndarray | None:
    """Cluster labels for the coverage term, or None when the spec skips it."""
    if not coverage_applies(lambda_s, frontier.step_texts):
        return None
    if frontier.embeddings is None:
        raise ValueError("frontier: ETS coverage needs embeddings of the candidates' newest steps")
    return cluster_steps(frontier.embeddings, cluster_distance)


def select_ets(
    frontier: Frontier, width: int, *, softmax_temperature: float, lambda_c: float, lambda_s: float,
    cluster_distance: float, node_cost: str = "uniform", time_limit_s: float = 0.5,
    formulation: str = "compact", warm_start: bool = True, lp_first: bool = True,
) -> Selection:
    """Keep-set by the integer program, then REBASE over the kept candidates.

    ``time_limit_s`` bounds the whole selection (clustering and building count against it); the
    solver gets what is left. No feasible keep-set by then -> plain REBASE, status "fallback".
    """
    started = time.perf_counter()
    n = frontier.size
    scores = frontier.scores
    if n == 0 or width <= 0:
        return Selection(counts=(0,) * n, solver_status="trivial")

    def plain_rebase(status: SolverStatus, clusters: int = 0) -> Selection:
        """REBASE over every candidate: the program's answer when it is trivial, else its fallback."""
        counts = rebase_allocation(scores, width, softmax_temperature)
        keep = (True,) * n if status == "trivial" else None
        return Selection(counts=tuple(int(c) for c in counts), solver_status=status, clusters=clusters, keep=keep)

    if n == 1 or lambda_c == 0:  # the cases ``uses_coverage`` excludes
        # One candidate, or no node cost: every term is non-decreasing in x, so keeping all is
        # optimal, and then REBASE over the kept set is plain REBASE.
        return plain_rebase("trivial")
    labels = cluster_labels(frontier, lambda_s, cluster_distance)
    inst = build_instance(frontier, width, softmax_temperature, lambda_c, lambda_s, node_cost, labels)
    k = inst.num_clusters
    # The solver gets what is left minus a 10% reserve for the REBASE pass and bookkeeping after
    # it, so the selection as a whole stays within the limit; none left -> not even built.
    if time.perf_counter() - started >= 0.9 * time_limit_s:
        return plain_rebase("fallback", k)
    prog = build_program(inst, formulation)
    start = None
    if warm_start:
        # REBASE's own keep-set is always feasible: HiGHS starts with an incumbent, so a time
        # limit still returns a keep-set at least as good as plain REBASE's.
        start = (inst.outcome > 0).astype(float)
    left = 0.9 * time_limit_s - (time.perf_counter() - started)
    solved = solve_highs(prog, left, start, lp_first=lp_first) if left > 0 else None
    if solved is None or solved.keep is None or not solved.keep.any():
        return plain_rebase("fallback", k)
    counts = rebase_allocation(scores, width, softmax_temperature, keep=solved.keep)
    return Selection(
        counts=tuple(int(c) for c in counts),
        solver_status="optimal" if solved.status == "optimal" else "time_limit",
        objective=inst.objective(solved.keep), clusters=k, keep=tuple(bool(b) for b in solved.keep),
    )
