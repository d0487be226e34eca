"""Semantic clustering of candidates' newest steps for the ETS coverage term.

Agglomerative clustering (scipy), average linkage on cosine distance, cut at ``cluster_distance``
(0.05 in the reference). Embeddings come from the caller (the reward server's embedder).

Speed-up, exact: average linkage only merges two clusters at height <= t if some pair across
them is within t, so every flat cluster at cut t lies inside one connected component of the
graph "cosine distance <= t"; merges inside a component depend only on its own distances. So the
components are found first (one matrix product and a threshold) and linkage runs per component
with more than one member - at the reference's 0.05 cut most steps are singletons.
"""
from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
from threadpoolctl import ThreadpoolController
from scipy.cluster.hierarchy import linkage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import squareform


def coverage_applies(lambda_s: float, step_texts: Sequence[str]) -> bool:
    """The spec skips the coverage term when lambda_s = 0, N = 1, or all step texts are equal."""
    return lambda_s > 0 and len(step_texts) > 1 and len(set(step_texts)) > 1


_blas: ThreadpoolController | None = None
_blas_lock = threading.Lock()


def _one_blas_thread():  # type: ignore[no-untyped-def]
    """Context limiting BLAS to one thread. The product is small; on a busy host OpenBLAS's
    thread pool turned a ~1 ms product into 15-70 ms (measured on the 2-core dev machine).
    Costs ~80 us; the controller (a scan of loaded libraries) is built once, lazily."""
    global _blas
    with _blas_lock:
        if _blas is None:
            _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")


def cosine_distances(embeddings: np.ndarray) -> np.ndarray:
    """Full (N, N) cosine distance matrix (rows re-normalised; clipped to [0, 2]; zero diagonal)."""
    # float32 throughout the product: twice as fast as float64, and its ~1e-7 error is far below
    # any meaningful cut.
    emb = np.asarray(embeddings, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", emb, emb))[:, None]
    norms[norms == 0] = 1.0
    unit = emb / norms
    with _one_blas_thread():
        product = unit @ unit.T
    dist = 1.0 - product.astype(np.float64)
    np.clip(dist, 0.0, 2.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def _cut(z: np.ndarray, n: int, t: float) -> np.ndarray:
    """Flat clusters of a linkage at height t (fcluster's "distance" criterion for a monotone
    linkage such as average): apply every merge at height <= t, then label each leaf by its root."""
    parent = np.arange(2 * n - 1)
    for i in range(n - 1):
        if z[i, 2] > t:
            break  # linkage rows are sorted by height
        parent[int(z[i, 0])] = n + i
        parent[int(z[i, 1])] = n + i
    roots = np.empty(n, dtype=np.int64)
    for leaf in range(n):
        r = leaf
        while parent[r] != r:
            r = parent[r]
        roots[leaf] = r
    return roots


def cluster_steps(embeddings: np.ndarray, cluster_distance: float) -> np.ndarray:
    """Cluster label per row (0..K-1, dense, in order of first appearance)."""
    n = int(np.asarray(embeddings).shape[0])
    if n <= 1:
        return np.zeros(n, dtype=np.int64)
    dist = cosine_distances(embeddings)
    close = dist <= cluster_distance
    np.fill_diagonal(close, False)
    if not close.any():
        return np.arange(n, dtype=np.int64)
    n_comp, raw = connected_components(csr_matrix(close), directed=False)
    raw = raw.astype(np.int64)
    next_label = n_comp
    sizes = np.bincount(raw, minlength=n_comp)
    for c in np.flatnonzero(sizes > 2):
        idx = np.flatnonzero(raw == c)
        sub = dist[np.ix_(idx, idx)]
        if sub.max() <= cluster_distance:
            continue  # every pair within the cut: every average is too, one cluster
        roots = _cut(linkage(squareform(sub, checks=False), method="average"), len(idx), cluster_distance)
        _, local = np.unique(roots, return_inverse=True)
        raw[idx] = next_label + local
        next_label += int(local.max()) + 1
    # (Components of two are one cluster: their single pair is within the cut.)
    _, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    return rank[inverse].astype(np.int64)
