"""The pure search algorithm: tree, selection methods (rebase, ets, beam, dvts, best_of_n; one
registry in ``selection``), the async search loop (``ets.search.loop.run_search``) and answer
choice (``ets.search.answers``).

No I/O: the loop awaits the ``StepGenerator`` / ``StepScorer`` interfaces only, and nothing here
imports a transport, a client or the service (tests/package/test_layout.py checks it). The CBC reference
solver of the ETS program is the benchmark's (bench/selection.py), not the product's.
"""
