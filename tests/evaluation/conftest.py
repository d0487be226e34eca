"""``ets eval``'s tests (``ets.evaluation``): datasets, runs, reports, the paired sample store."""
