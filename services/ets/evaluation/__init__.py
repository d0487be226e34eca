"""Evaluation of search methods over a dataset, through a live search service (``ets eval``):
``evaluate`` loads the dataset, plans and runs the searches; ``report`` (pure) summarises them
into intervals, tables and the accuracy-vs-KV plot."""
