"""The engine processes' tests (``ets.engine``): launch arguments, process groups, supervision."""
