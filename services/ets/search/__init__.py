"""The pure search algorithm: its configuration (``config``), tree, selection methods (rebase,
ets, beam, dvts, best_of_n; one registry in ``selection``), the async search loop
(``ets.search.loop.run_search``), the one pipeline every caller runs (``pipeline``: root, loop,
vote) and answer choice (``ets.search.answers``).

No I/O: the loop awaits the ``StepGenerator`` / ``StepScorer`` interfaces only, and nothing here
imports a transport, a client, the service, the policy, the reward server or the settings loader,
not even transitively (tests/package/test_layout.py checks it in a fresh interpreter). The CBC
reference solver of the ETS program is the benchmark's (bench/selection.py), not the product's.
"""
