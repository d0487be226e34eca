"""Prometheus metrics of the reward server (``ets_reward_*``), served over HTTP (default 9092).

Owns the metric definitions on a per-server ``CollectorRegistry`` (so several servers can live
in one test process) and the HTTP exporter. Series:
- ``ets_reward_requests_total{method,code}``: RPCs by method and final gRPC code.
- ``ets_reward_errors_total{method,code}``: the non-OK subset.
- ``ets_reward_request_seconds{method}``: RPC latency histogram.
- ``ets_reward_request_items{method}``: trajectories / texts per RPC.
- ``ets_reward_model_batch_items{model}``: items per model call after micro-batching (prm, embedder).
- ``ets_reward_prm_tokens_total{kind}``: PRM prompt and cached tokens (kind=prompt|cached).
- ``ets_reward_scored_steps_total``: step scores returned.
- ``ets_reward_backend_up``: 1 while the PRM backend can score.
- ``ets_reward_prm_restarts_total``: restarts of the supervised SGLang PRM server.
- ``ets_reward_inflight_requests``: RPCs being handled.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class RewardMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("ets_reward_requests", "Reward RPCs by method and gRPC code",
                                ["method", "code"], registry=r)
        self.errors = Counter("ets_reward_errors", "Reward RPCs that ended with a non-OK gRPC code",
                              ["method", "code"], registry=r)
        self.latency = Histogram("ets_reward_request_seconds", "Reward RPC latency", ["method"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.request_items = Histogram("ets_reward_request_items", "Trajectories or texts per RPC", ["method"],
                                       buckets=_SIZE_BUCKETS, registry=r)
        self.model_batch = Histogram("ets_reward_model_batch_items", "Items per model call after micro-batching",
                                     ["model"], buckets=_SIZE_BUCKETS, registry=r)
        self.prm_tokens = Counter("ets_reward_prm_tokens", "PRM prompt tokens and prefix-cached tokens", ["kind"],
                                  registry=r)
        self.scored_steps = Counter("ets_reward_scored_steps", "Step scores returned", registry=r)
        self.backend_up = Gauge("ets_reward_backend_up", "1 while the PRM backend can score", registry=r)
        self.prm_restarts = Counter("ets_reward_prm_restarts", "Restarts of the supervised SGLang PRM server",
                                    registry=r)
        self.inflight = Gauge("ets_reward_inflight_requests", "Reward RPCs being handled", registry=r)
        # Pre-create the labelled series so a scrape shows them before the first call.
        for method in ("Score", "Embed", "Info"):
            self.latency.labels(method)
            self.requests.labels(method, "OK")
        for model in ("prm", "embedder"):
            self.model_batch.labels(model)
        for kind in ("prompt", "cached"):
            self.prm_tokens.labels(kind)
        self._server: Any = None

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the HTTP exporter; returns the bound port (``port`` 0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
