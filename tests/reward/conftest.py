"""The reward server's tests (``ets.reward``): adapters, rules PRMs, gRPC, backends, supervision.

In-thread reward servers: ``reward_servers`` (tests/support/reward_fixtures.py)."""
