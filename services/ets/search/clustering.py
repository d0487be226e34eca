"""Semantic clustering of candidates' newest steps for the ETS coverage term.

Agglomerative clustering (scipy), average linkage on cosine distance, cut at ``cluster_distance``
(0.05 in the reference). Embeddings come from the caller (the reward server's embedder).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform


def coverage_applies(lambda_s: float, step_texts: Sequence[str]) -> bool:
    """The spec skips the coverage term when lambda_s = 0, N = 1, or all step texts are equal."""
    return lambda_s > 0 and len(step_texts) > 1 and len(set(step_texts)) > 1


def cluster_steps(embeddings: np.ndarray, cluster_distance: float) -> np.ndarray:
    """Cluster label per row (0..K-1, in order of first appearance)."""
    emb = np.asarray(embeddings, dtype=np.float64)
    n = emb.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    # Cosine distance via one matrix product (much faster than pdist(metric="cosine") at width
    # 1024); rows are re-normalised so callers' rounding cannot push distances below 0.
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    unit = emb / norms
    dist = 1.0 - unit @ unit.T
    np.clip(dist, 0.0, 2.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    condensed = squareform(dist, checks=False)
    tree = linkage(condensed, method="average")
    raw = fcluster(tree, t=cluster_distance, criterion="distance")
    # Relabel in first-appearance order so labels are stable and dense.
    _, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    return rank[inverse].astype(np.int64)
