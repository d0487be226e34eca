"""The search service: one transport-neutral runner (``runner``: admission, deadline, search,
metrics; ``status``: the one error-to-status mapping) behind the gRPC transport (``server``,
``main`` for ``ets serve``), its live upstreams and readiness, the CLI client and evaluation."""
