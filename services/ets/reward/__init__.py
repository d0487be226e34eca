"""The reward server: process reward model (PRM) scoring and sentence embeddings over gRPC.

``adapters`` (per PRM type formatting/readout), ``backends`` (transformers in-process, SGLang
supervised or attached), ``embedder``, ``batching``, ``metrics``, ``server`` (``ets reward-serve``)
and ``client`` (``RewardClient``, the search's ``StepScorer``).
"""
