"""The reward server: process reward model (PRM) scoring and sentence embeddings over gRPC.

``adapters`` (per PRM type formatting/readout), ``backends`` (transformers in-process, SGLang
supervised or attached, rules), ``embedder``, ``batching``, ``metrics``, ``settings``, ``server``
(``ets reward-serve``, admission by items through ``ets.admission``) and ``client``
(``RewardClient``, the search's ``StepScorer``, on ``ets.search.interfaces``). Must not import
the search service: the two servers share only the API, ``ets.admission``, ``ets.security``
and ``ets.engine``; the PRM type names are the reward server's own (``prm_types``), which the
search service's edge checks a request against.
"""
