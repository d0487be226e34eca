"""The sample store of a paired evaluation: common random numbers across methods, widths and settings.

Owns ``SampleStore`` (an append-only JSONL file of policy samples, PRM scores and embeddings,
loaded on open so a cut-off evaluation resumes and a rerun replays), ``StoreGenerator`` and
``StoreScorer`` (the search core's ``StepGenerator`` / ``StepScorer`` seams in front of the live
policy and reward clients) and ``tree_digest`` (one hash of a search's finished trajectories).

What makes a sample the same: the k-th sample of a node is keyed by exactly what the engine is
asked, the node's prefix ids, its step budget (``max_new_tokens`` after the loop's cap near
``max_tokens``), the temperature, and the generator's identity (policy model, stop strings,
trimming, top-p; plus a configuration label in unpaired mode). Inside one search the j-th request
for a key takes the next samples of that key (two nodes with identical ids, or a node expanded
twice, get distinct samples as they would from the engine), so marginally every configuration
still sees i.i.d. policy samples; jointly they are paired. A PRM score is keyed by the scorer's
identity, the question and the step texts; an embedding by the embedder's identity and the text.
Every sample is still drawn by the real policy server: the store only remembers what it sent.

File format (``ets-sample-store`` version 1), one JSON object per line:

    {"kind": "meta", "format": "ets-sample-store", "version": 1, ...}   first line
    {"kind": "sample", "key": HEX, "k": 3, "ids": [...], "text": "...", "finish": "step",
     "prompt_tokens": 71, "cached_tokens": 64}
    {"kind": "score", "key": HEX, "score": 0.9}
    {"kind": "embed", "key": HEX, "dim": 384, "b64": "<float32 little-endian, base64>"}

A line cut off by a killed process is dropped on open (and the file truncated to its last whole
line before anything is appended). Concurrent searches that need the same missing sample share
one draw (a pending future per sample); each draw is one batched call to the inner generator.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Sequence, TypeVar

import numpy as np

from ets.search.interfaces import (
    ExpandRequest, SampledStep, ScoredTrajectory, StepGenerator, StepParams, StepReading, StepScorer,
)

_K = TypeVar("_K")
_V = TypeVar("_V")

FORMAT = "ets-sample-store"
VERSION = 1


class StoreError(ValueError):
    """A store file that cannot be used (names the file and the line)."""


def _digest(*parts: Any) -> str:
    """A stable hex key of JSON-serialisable parts."""
    return hashlib.blake2b(json.dumps(parts, separators=(",", ":"), ensure_ascii=False).encode(),
                           digest_size=16).hexdigest()


def sample_key(identity: str, prefix_ids: Sequence[int], max_new_tokens: int, temperature: float) -> str:
    """The key of a node's samples: everything the engine is asked, and by whom."""
    return _digest("sample", identity, int(max_new_tokens), repr(float(temperature)), [int(t) for t in prefix_ids])


def score_key(identity: str, question: str, steps: Sequence[str]) -> str:
    return _digest("score", identity, question, list(steps))


def embed_key(identity: str, text: str) -> str:
    return _digest("embed", identity, text)


@dataclass
class Counts:
    """Samples (and scores, embeddings) asked of the store and how many of them had to be drawn."""

    samples_requested: int = 0
    samples_drawn: int = 0
    scores_requested: int = 0
    scores_computed: int = 0
    embeds_requested: int = 0
    embeds_computed: int = 0

    def add(self, other: "Counts") -> None:
        _count(self, **{name: getattr(other, name) for name in self.__dataclass_fields__})


class SampleStore:
    """Samples, scores and embeddings by key, loaded from and appended to ``path`` (None: in memory)."""

    def __init__(self, path: str | Path | None = None, meta: dict[str, Any] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.samples: dict[tuple[str, int], SampledStep] = {}  # (key, k) -> the key's k-th sample
        self.scores: dict[str, float] = {}
        self.embeddings: dict[str, np.ndarray] = {}
        self.meta: dict[str, Any] = {}
        self.counts = Counts()  # since this store was opened
        self._pending: dict[tuple[str, int], asyncio.Future[SampledStep]] = {}
        self._pending_scores: dict[str, asyncio.Future[float]] = {}
        self._pending_embeds: dict[str, asyncio.Future[np.ndarray]] = {}
        self._file: Any = None
        if self.path is not None:
            self._open(meta or {})

    # ---- persistence ------------------------------------------------------------------------------
    def _open(self, meta: dict[str, Any]) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep = 0  # bytes of whole lines
        if self.path.exists():
            data = self.path.read_bytes()
            keep = data.rfind(b"\n") + 1
            for lineno, line in enumerate(data[:keep].decode("utf-8").splitlines(), 1):
                if line.strip():
                    self._load_line(line, lineno)
        self._file = open(self.path, "r+b" if self.path.exists() else "wb")
        self._file.truncate(keep)  # a line cut off by a killed run is dropped
        self._file.seek(keep)
        if not self.meta:
            self.meta = {"kind": "meta", "format": FORMAT, "version": VERSION, **meta}
            self._write([self.meta])

    def _load_line(self, line: str, lineno: int) -> None:
        where = f"{self.path}:{lineno}"
        try:
            row = json.loads(line)
            kind = row["kind"]
            if kind == "meta":
                if row.get("format") != FORMAT or row.get("version") != VERSION:
                    raise StoreError(f"{where}: not an {FORMAT} version {VERSION} file")
                self.meta = row
            elif kind == "sample":
                self.samples[(row["key"], int(row["k"]))] = SampledStep(
                    token_ids=tuple(int(t) for t in row["ids"]), text=str(row["text"]), finish=row["finish"],
                    prompt_tokens=int(row.get("prompt_tokens", 0)), cached_tokens=int(row.get("cached_tokens", 0)))
            elif kind == "score":
                self.scores[row["key"]] = float(row["score"])
            elif kind == "embed":
                vec = np.frombuffer(base64.b64decode(row["b64"]), dtype="<f4")
                if vec.shape[0] != int(row["dim"]):
                    raise StoreError(f"{where}: embedding has {vec.shape[0]} values, dim says {row['dim']}")
                self.embeddings[row["key"]] = vec.astype(np.float32)
            else:
                raise StoreError(f"{where}: unknown kind {kind!r}")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            if isinstance(err, StoreError):
                raise
            raise StoreError(f"{where}: unreadable store line ({type(err).__name__}: {err})") from None
        if lineno == 1 and not self.meta:
            raise StoreError(f"{where}: the first line must be the store's meta line")

    def _write(self, rows: Iterable[dict[str, Any]]) -> None:
        if self._file is None:
            return
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def __enter__(self) -> "SampleStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def sample_count(self) -> int:
        return len(self.samples)

    # ---- samples -------------------------------------------------------------------------------------
    async def take(self, wants: Sequence[tuple[str, int, int, ExpandRequest]], params: StepParams,
                   inner: StepGenerator, counts: Counts | None = None) -> list[list[SampledStep]]:
        """For each ``(key, start, n, request)``: samples ``start .. start+n-1`` of ``key``; the
        missing ones (not stored, not being drawn) are drawn in one ``inner.expand`` call, each
        run of consecutive missing samples of a key as one request."""
        slots = [((key, k), request) for key, start, n, request in wants for k in range(start, start + n)]

        async def draw(todo: list[tuple[tuple[str, int], ExpandRequest]]) -> list[SampledStep]:
            runs: list[list[tuple[tuple[str, int], ExpandRequest]]] = []
            for slot in todo:  # in request order, so a key's missing samples are adjacent
                prev = runs[-1][-1][0] if runs else None
                if prev is not None and prev[0] == slot[0][0] and prev[1] + 1 == slot[0][1]:
                    runs[-1].append(slot)
                else:
                    runs.append([slot])
            outputs = await inner.expand([_draw(run[0][1], *run[0][0], len(run)) for run in runs], params)
            if len(outputs) != len(runs) or any(len(o) != len(r) for o, r in zip(outputs, runs, strict=False)):
                raise ValueError("generator returned the wrong number of samples")
            steps = [step for out in outputs for step in out]
            self._write({"kind": "sample", "key": key, "k": k, "ids": list(step.token_ids), "text": step.text,
                         "finish": step.finish, "prompt_tokens": step.prompt_tokens,
                         "cached_tokens": step.cached_tokens}
                        for ((key, k), _), step in zip(todo, steps, strict=True))
            return steps

        values, drawn = await self.cached([slot for slot, _ in slots], self.samples, self._pending, draw, slots)
        _count(counts, self.counts, samples_requested=len(slots), samples_drawn=drawn)
        out: list[list[SampledStep]] = []
        for _, _, n, _ in wants:
            out.append(values[:n])
            values = values[n:]
        return out

    # ---- scores and embeddings ---------------------------------------------------------------------------
    async def cached(self, keys: Sequence[_K], table: dict[_K, _V], pending: dict[_K, asyncio.Future[_V]],
                     compute: Callable[[list[Any]], Awaitable[Sequence[_V]]],
                     inputs: Sequence[Any]) -> tuple[list[_V], int]:
        """Values of ``keys`` from ``table``; the missing ones computed in one ``compute(inputs)``
        call (deduplicated; a value being computed for a concurrent caller is awaited, not
        computed again). Returns (values, computed)."""
        loop = asyncio.get_running_loop()
        todo: dict[_K, Any] = {}
        # The futures of values other callers are computing, taken now: a failed computation pops
        # its future (so the next caller computes afresh), and this caller must still see its error.
        theirs: dict[_K, asyncio.Future[_V]] = {}
        for key, value in zip(keys, inputs, strict=True):
            if key in table:
                continue
            if key in pending:
                theirs[key] = pending[key]
            elif key not in todo:
                todo[key] = value
        for key in todo:
            pending[key] = loop.create_future()
        if todo:
            try:
                values = list(await compute(list(todo.values())))
                if len(values) != len(todo):
                    raise ValueError(f"returned {len(values)} values for {len(todo)} inputs")
            except BaseException as err:
                for key in todo:
                    fut = pending.pop(key)
                    fut.set_exception(err if isinstance(err, Exception) else asyncio.CancelledError())
                    fut.exception()  # retrieved: no "never retrieved" warning when nobody else waits
                raise
            for key, value in zip(todo, values, strict=True):
                table[key] = value
                pending.pop(key).set_result(value)
        out = [table[k] if k in table else await theirs[k] for k in keys]
        return out, len(todo)

    async def score(self, identity: str, trajectories: Sequence[ScoredTrajectory], inner: StepScorer,
                    counts: Counts | None = None) -> list[float]:
        keys = [score_key(identity, t.question, t.steps) for t in trajectories]

        async def compute(todo: list[ScoredTrajectory]) -> list[float]:
            values = [float(v) for v in await inner.score_last_steps(todo)]
            self._write({"kind": "score", "key": score_key(identity, t.question, t.steps), "score": v}
                        for t, v in zip(todo, values, strict=True))
            return values

        values, computed = await self.cached(keys, self.scores, self._pending_scores, compute, trajectories)
        _count(counts, self.counts, scores_requested=len(keys), scores_computed=computed)
        return [float(v) for v in values]

    async def embed(self, identity: str, texts: Sequence[str], inner: StepScorer,
                    counts: Counts | None = None) -> np.ndarray:
        keys = [embed_key(identity, t) for t in texts]

        async def compute(todo: list[str]) -> list[np.ndarray]:
            rows = np.asarray(await inner.embed(todo), dtype=np.float32)
            if rows.ndim != 2 or rows.shape[0] != len(todo):
                raise ValueError(f"scorer returned embeddings of shape {rows.shape} for {len(todo)} texts")
            self._write({"kind": "embed", "key": embed_key(identity, t), "dim": int(r.shape[0]),
                         "b64": base64.b64encode(r.astype("<f4").tobytes()).decode("ascii")}
                        for t, r in zip(todo, rows, strict=True))
            return list(rows)

        values, computed = await self.cached(keys, self.embeddings, self._pending_embeds, compute, texts)
        _count(counts, self.counts, embeds_requested=len(keys), embeds_computed=computed)
        if not values:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack(values).astype(np.float32)


def _count(*counts: Counts | None, **deltas: int) -> None:
    for c in counts:
        if c is not None:
            for name, delta in deltas.items():
                setattr(c, name, getattr(c, name) + delta)


def _draw(request: ExpandRequest, key: str, start: int, n: int) -> ExpandRequest:
    """The engine request for samples ``start .. start+n-1`` of ``key``. Its seed is the key's own
    (sample k gets seed + k from the generator), so an engine that honours seeds draws the same
    k-th sample whichever search asks first."""
    seed = (int(key[:8], 16) + start) & 0x7FFFFFFF
    return ExpandRequest(prefix_ids=request.prefix_ids, n=n, seed=seed, max_new_tokens=request.max_new_tokens)


class StoreGenerator:
    """``StepGenerator`` of ONE search over a shared store: the j-th request of a key in this search
    takes that key's next samples. ``identity`` names the policy (and, unpaired, the configuration)."""

    def __init__(self, store: SampleStore, inner: StepGenerator, identity: str) -> None:
        self.store, self.inner, self.identity = store, inner, identity
        self.counts = Counts()
        self._used: dict[str, int] = {}

    async def expand(self, requests: Sequence[ExpandRequest], params: StepParams) -> list[list[SampledStep]]:
        wants: list[tuple[str, int, int, ExpandRequest]] = []
        for r in requests:
            if r.n < 0:
                raise ValueError(f"n: must be >= 0, got {r.n}")
            budget = r.max_new_tokens if r.max_new_tokens is not None else params.max_new_tokens
            key = sample_key(self.identity, r.prefix_ids, budget, params.temperature)
            start = self._used.get(key, 0)
            self._used[key] = start + r.n
            wants.append((key, start, r.n, ExpandRequest(r.prefix_ids, r.n, None, budget)))
        return await self.store.take(wants, params, self.inner, self.counts)

    def read_step(self, text: str) -> StepReading:
        return self.inner.read_step(text)


class StoreScorer:
    """``StepScorer`` over a shared store: scores and embeddings cached by their inputs."""

    def __init__(self, store: SampleStore, inner: StepScorer, prm_identity: str, embed_identity: str) -> None:
        self.store, self.inner = store, inner
        self.prm_identity, self.embed_identity = prm_identity, embed_identity
        self.counts = Counts()

    async def score_last_steps(self, trajectories: Sequence[ScoredTrajectory]) -> list[float]:
        return await self.store.score(self.prm_identity, trajectories, self.inner, self.counts)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        return await self.store.embed(self.embed_identity, texts, self.inner, self.counts)


def tree_digest(trajectories: Sequence[Any]) -> str:
    """One hash of a search's finished trajectories in order (token ids, exact step scores, finish
    reason, depth): equal digests mean the same tree was searched to the same ends."""
    return _digest("tree", [[list(t.token_ids), [repr(float(s)) for s in t.step_scores], str(t.finish_reason),
                             int(t.depth)] for t in trajectories])
