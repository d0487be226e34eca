"""Random search frontiers for tests and the selection benchmark (seeded, pure numpy).

``grown_frontier`` grows a tree by a few REBASE-like depths (random scores and step lengths) and
gives the last depth random unit embeddings with some near-duplicate steps: the realistic shape
selection sees in a search. ``small_frontier`` draws arbitrary small trees (all leaves at one depth)
with random clusters, for exhaustive-enumeration checks.
"""
from __future__ import annotations

import numpy as np

from ets.search.rebase import rebase_allocation
from ets.search.tree import Frontier


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _embeddings_with_duplicates(
    rng: np.random.Generator, n: int, dim: int, dup_fraction: float
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Unit embeddings where about ``dup_fraction`` of rows nearly repeat an earlier row
    (cosine distance ~1e-3, well under the 0.05 cut); texts repeat along with them."""
    emb = _unit(rng, n, dim)
    texts = [f"step {i}" for i in range(n)]
    for i in range(1, n):
        if rng.random() < dup_fraction:
            j = int(rng.integers(0, i))
            noisy = emb[j] + 0.03 * _unit(rng, 1, dim)[0] / np.sqrt(2)
            emb[i] = noisy / np.linalg.norm(noisy)
            texts[i] = texts[j]
    return emb, tuple(texts)


def grown_frontier(
    rng: np.random.Generator, width: int, depths: int = 4, dim: int = 384, dup_fraction: float = 0.3,
    prompt_tokens: int = 120, step_tokens: tuple[int, int] = (16, 160), softmax_temperature: float = 0.2,
) -> Frontier:
    """A frontier after ``depths`` REBASE expansions of a root with ``width`` children."""
    next_id = 1
    node_tokens: dict[int, int] = {0: prompt_tokens}
    # Each candidate: (its ancestor path root-first, own node id)
    frontier: list[tuple[tuple[int, ...], int]] = []
    for _ in range(width):
        frontier.append(((0,), next_id))
        node_tokens[next_id] = int(rng.integers(*step_tokens))
        next_id += 1
    for _ in range(depths - 1):
        scores = rng.random(len(frontier))
        counts = rebase_allocation(scores, width, softmax_temperature)
        grown: list[tuple[tuple[int, ...], int]] = []
        for (path, nid), k in zip(frontier, counts, strict=True):
            for _ in range(int(k)):
                grown.append((path + (nid,), next_id))
                node_tokens[next_id] = int(rng.integers(*step_tokens))
                next_id += 1
        frontier = grown
    emb, texts = _embeddings_with_duplicates(rng, len(frontier), dim, dup_fraction)
    return Frontier(
        scores=rng.random(len(frontier)),
        ancestors=tuple(p for p, _ in frontier),
        node_tokens={j: node_tokens[j] for p, _ in frontier for j in p},
        candidate_tokens=tuple(node_tokens[nid] for _, nid in frontier),
        step_texts=texts,
        embeddings=emb,
    )


def small_frontier(
    rng: np.random.Generator, n: int, max_depth: int = 4, n_clusters: int | None = None, dim: int = 16,
) -> Frontier:
    """A random tree whose n leaves share one depth; leaves fall into random clusters."""
    depth = int(rng.integers(1, max_depth + 1))
    next_id = 1
    node_tokens: dict[int, int] = {0: int(rng.integers(5, 50))}
    level: list[tuple[tuple[int, ...], int]] = [((), 0)]  # (path above, node id)
    for _ in range(depth - 1):
        # A non-decreasing level size, at most n, every node of the level above has a child.
        size = int(rng.integers(len(level), n + 1))
        parents = list(range(len(level))) + rng.integers(0, len(level), size - len(level)).tolist()
        new_level = []
        for p in sorted(parents):
            path, pid = level[p]
            new_level.append((path + (pid,), next_id))
            node_tokens[next_id] = int(rng.integers(1, 40))
            next_id += 1
        level = new_level
    parents = list(range(len(level))) + rng.integers(0, len(level), n - len(level)).tolist()
    leaves = [(level[p][0] + (level[p][1],)) for p in sorted(parents)]
    k = n_clusters if n_clusters is not None else int(rng.integers(1, n + 1))
    centers = _unit(rng, k, dim)
    labels = rng.integers(0, k, n)
    emb = centers[labels] + 1e-4 * rng.standard_normal((n, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return Frontier(
        scores=rng.random(n),
        ancestors=tuple(leaves),
        node_tokens={j: node_tokens[j] for p in leaves for j in p},
        candidate_tokens=tuple(int(t) for t in rng.integers(1, 40, n)),
        step_texts=tuple(f"cluster {c}" for c in labels),
        embeddings=emb,
    )
