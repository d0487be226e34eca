"""The search tree: one node per reasoning step, and the frontier view selection works on.

Owns ``Node`` (token ids, text, PRM score, parent, depth, cumulative tokens, terminal flag and
reason), ``SearchTree`` (node bookkeeping, prefixes, logical KV size) and ``Frontier`` (what a
selection method sees: candidate scores, ancestry with per-node token counts, newest-step texts
and embeddings). Pure data; no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np

from ets.search.interfaces import StepFinish

# Why a trajectory ended: a final-answer marker in its newest step, the policy's end of sequence,
# the cumulative token budget, or the depth cap (non-terminal nodes left when the loop stops).
FinishReason = Literal["answer", "eos", "max_tokens", "max_depth"]


@dataclass(eq=False)
class Node:
    """One reasoning step (the root holds the formatted prompt)."""

    id: int
    parent: Node | None
    depth: int
    token_ids: tuple[int, ...]  # this node's own tokens (root: the prompt ids)
    text: str  # the step as generated (delimiter kept when the model type keeps it)
    plain_text: str  # the step without its delimiter: what the PRM and the embedder see
    cum_tokens: int  # tokens from the root to here, root included
    score: float | None = None  # PRM score of this step (None for the root)
    step_finish: StepFinish | None = None
    ends_solution: bool = False  # the step holds the final answer (the generator's reading of it)
    terminal: bool = False
    finish_reason: FinishReason | None = None
    # Position among the parent's children at creation; with the parent's key it names the node
    # deterministically (used to derive per-node sampling seeds).
    key: tuple[int, ...] = ()
    group: int | None = None  # DVTS subtree id (None for other methods)
    children: list[Node] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def path(self) -> list[Node]:
        """Nodes from the root to this node, inclusive."""
        out: list[Node] = []
        node: Node | None = self
        while node is not None:
            out.append(node)
            node = node.parent
        out.reverse()
        return out

    def ancestors(self) -> list[Node]:
        """Nodes from the root to this node's parent."""
        return self.path()[:-1]


class SearchTree:
    """All nodes of one search, rooted at the formatted prompt."""

    def __init__(self, prompt_ids: Sequence[int], question: str) -> None:
        ids = tuple(int(t) for t in prompt_ids)
        self.question = question
        self.root = Node(
            id=0, parent=None, depth=0, token_ids=ids, text="", plain_text="", cum_tokens=len(ids)
        )
        self.nodes: list[Node] = [self.root]

    def add_child(
        self, parent: Node, token_ids: Sequence[int], text: str, plain_text: str,
        step_finish: StepFinish | None = None, group: int | None = None, ends_solution: bool = False,
    ) -> Node:
        ids = tuple(int(t) for t in token_ids)
        child = Node(
            id=len(self.nodes), parent=parent, depth=parent.depth + 1, token_ids=ids, text=text,
            plain_text=plain_text, cum_tokens=parent.cum_tokens + len(ids), step_finish=step_finish,
            ends_solution=ends_solution,
            key=parent.key + (len(parent.children),),
            group=parent.group if group is None else group,
        )
        parent.children.append(child)
        self.nodes.append(child)
        return child

    @staticmethod
    def prefix_ids(node: Node) -> tuple[int, ...]:
        """The node's full token sequence (root prompt included)."""
        out: list[int] = []
        for n in node.path():
            out.extend(n.token_ids)
        return tuple(out)

    @staticmethod
    def step_texts(node: Node) -> list[str]:
        """Plain step texts from the first step to this node (the root has none)."""
        return [n.plain_text for n in node.path()[1:]]

    @staticmethod
    def kv_tokens(candidates: Iterable[Node]) -> int:
        """Logical KV size: tokens in the union of the root-to-candidate paths (each node once)."""
        seen: set[int] = set()
        total = 0
        for cand in candidates:
            node: Node | None = cand
            while node is not None and node.id not in seen:
                seen.add(node.id)
                total += node.num_tokens
                node = node.parent
        return total

    @staticmethod
    def frontier_of(candidates: Sequence[Node], embeddings: np.ndarray | None = None) -> "Frontier":
        """The frontier view of ``candidates`` (all at the current depth)."""
        ancestors: list[tuple[int, ...]] = []
        node_tokens: dict[int, int] = {}
        for cand in candidates:
            anc = cand.ancestors()
            ancestors.append(tuple(n.id for n in anc))
            for n in anc:
                node_tokens[n.id] = n.num_tokens
        return Frontier(
            scores=np.array([0.0 if c.score is None else float(c.score) for c in candidates], dtype=float),
            ancestors=tuple(ancestors),
            node_tokens=node_tokens,
            candidate_tokens=tuple(c.num_tokens for c in candidates),
            step_texts=tuple(c.plain_text for c in candidates),
            embeddings=embeddings,
        )


@dataclass(frozen=True)
class Frontier:
    """What a selection method sees of the current depth's N candidates.

    ``ancestors[i]`` lists the node ids on candidate i's path from the root (first) to its parent
    (last); ``node_tokens`` gives every such node's own token count. Candidates themselves are
    identified by position. ``embeddings`` (N, dim), L2-normalised, embed the newest step texts;
    only ETS with a coverage term needs them.
    """

    scores: np.ndarray
    ancestors: tuple[tuple[int, ...], ...]
    node_tokens: Mapping[int, int]
    candidate_tokens: tuple[int, ...]
    step_texts: tuple[str, ...]
    embeddings: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.scores)
        if not (len(self.ancestors) == len(self.candidate_tokens) == len(self.step_texts) == n):
            raise ValueError("frontier: scores, ancestors, candidate_tokens and step_texts differ in length")
        if self.embeddings is not None and self.embeddings.shape[0] != n:
            raise ValueError("frontier: embeddings must have one row per candidate")

    @property
    def size(self) -> int:
        return len(self.scores)

    def ancestor_ids(self) -> list[int]:
        """Distinct ancestor node ids, in first-seen order."""
        seen: dict[int, None] = {}
        for path in self.ancestors:
            for j in path:
                seen.setdefault(j, None)
        return list(seen)

    def kv_tokens(self, keep: Sequence[bool] | np.ndarray | None = None) -> int:
        """Logical KV size of the kept candidates (all when ``keep`` is None)."""
        idx = range(self.size) if keep is None else [i for i in range(self.size) if keep[i]]
        seen: set[int] = set()
        total = 0
        for i in idx:
            total += self.candidate_tokens[i]
            for j in self.ancestors[i]:
                if j not in seen:
                    seen.add(j)
                    total += self.node_tokens[j]
        return total

    def tree_tokens(self) -> int:
        return self.kv_tokens()
