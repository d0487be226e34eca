"""The pure search algorithm: tree, selection methods (rebase, ets, beam, dvts, best_of_n), the
async search loop (``ets.search.loop.run_search``) and answer choice (``ets.search.answers``).
No I/O: the loop awaits the ``StepGenerator`` / ``StepScorer`` interfaces only."""
