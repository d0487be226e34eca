"""The whole stack's tests (policy + reward + search service as real processes): searches,
failures, metrics, OpenAI, the real SmolLM2 policy.

The stack is shared across tests: ``shared_stack`` / ``search_stack`` (tests/support/service_fixtures.py)."""
