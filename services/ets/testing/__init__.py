"""Test and demo support that ships with the source but not with the search image: tiny local
models (``tiny_models``, ``python -m ets.testing.tiny_models``), random frontiers (``frontiers``),
scripted in-process upstreams (``upstreams``), the in-process service harness (``inprocess``) and
the development orchestrator that starts and stops the whole CPU stack (``stack``:
``scripts/demo.sh``, the stack tests, ``bench/stack.py``).

Nothing outside this package imports it (tests/package/test_layout.py), so Dockerfile.search can leave it
out. Used by the tests, the README's main job and the CPU compose profile, so it must not import
anything from outside the project at run time.
"""
