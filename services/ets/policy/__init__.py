"""The policy side: the async client of SGLang's native API (``client``: /generate, /tokenize,
retries and error mapping; ``routed``: the same behind sglang-router) and the search's
``StepGenerator`` on top of it (``generator``: step stops and trimming per policy model type).

Owns the wire to the policy engine; must not know about admission, transports or selection
(the search loop calls it only through ``ets.search.interfaces``).
"""
