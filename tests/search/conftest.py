"""The search core's tests (``ets.search``): config, tree, selection methods, the loop, answers.

Pure: in-process step sources (``ets.testing.upstreams``), no servers."""
