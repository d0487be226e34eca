"""The policy side's tests (``ets.policy``): the SGLang client, the step generator, prefill, the wire.

Engines come from the session's ``sglang_servers`` (tests/conftest.py)."""
