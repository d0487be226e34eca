"""The search service: one transport-neutral runner (``runner``: request checks, admission,
deadline, search, answer choice, metrics; ``status``: the one error-to-status mapping) behind two
thin transports (``server`` for gRPC with ``main`` for ``ets serve``, ``openai_http`` for the
OpenAI-compatible endpoint), its live upstreams and readiness, its settings, metrics and the
search admission's limits (``admission``, over ``ets.admission``).

Holds the service only: the gRPC client is ``ets.client``, the evaluation ``ets.evaluation``,
the in-process test harness is test support; none of them is imported from here.
"""
