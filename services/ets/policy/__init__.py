"""The policy side: everything the search service knows about the SGLang policy server.

``model_types`` is the ``PolicyModelType`` registry (how a model family writes steps and answers:
stop strings, answer markers, root format; ``SearchConfig.policy_model_type`` names one);
``client`` is the async client of SGLang's native HTTP API (token-exact ``/generate``,
``/tokenize``, retries, the wire's failure classes) and ``routed`` its variant behind
sglang-router; ``generator`` is the search's ``StepGenerator`` on top of it (a depth's expansions
as one batched call) and ``tokenize_root``. No metrics and no service types here: the search
service wraps these in its instrumentation (``ets.service.upstreams``).

Owns the wire to the policy engine; must not know about admission, transports or selection
(the search loop calls it only through ``ets.search.interfaces``).
"""
