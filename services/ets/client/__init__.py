"""Clients of the search service: the gRPC client, its channel (security, retry policy) and the
``ets search`` command. Used by people, by ``ets eval`` and by the tests; not part of the service
(nothing in the servers imports it)."""
