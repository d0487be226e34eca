"""The policy client behind sglang-router (the k8s scale-out overlay), and ``make_policy_client``.

The router (PyPI sglang-router 0.3.2, crate ``smg``) is not a transparent proxy of the engine's
native API, so ``RoutedPolicyClient`` overrides three things of ``PolicyClient``'s shared
wire/retry/parse path (tests/deployment/test_router.py shows each point on real processes):
- it has no ``/tokenize`` / ``/detokenize`` / ``/model_info`` (404): those go to ``engine_url``, one
  engine reached directly (any replica: tokenization is stateless);
- its ``/generate`` takes one ``sampling_params`` object, not a per-prompt list (422), and drops
  fields it does not model (``logit_bias``: refused here rather than silently ignored);
- its cache-aware policy routes on ``GenerateRequest::extract_text_for_routing``: the ids joined by
  spaces, a batch's prompts all concatenated into one string, matched against a per-worker
  character tree; a batch of k prompts matches at most 1/k of its text, below the 0.3 cache
  threshold, and falls back to the least-loaded worker. So every prompt goes out as its own
  ``/generate`` request (concurrently): each one is then routed by its own prefix, to the worker
  that served its parent;
- its ``/health`` is the router's liveness (200 with no engine up); ``/readiness`` is 503 until a
  worker is healthy, so ``health()`` asks that;
- an engine lost mid-call (or down before its health check notices) comes back as HTTP 500
  ``call_upstream_request_error``, which is retried here as the lost call it is.

The SGLang model gateway (PyPI ``smg`` 1.13.0, sglang-router's successor) repeats all three
wire-format findings (no ``/tokenize`` or ``/model_info``: 404; a list of ``sampling_params``: 422;
``logit_bias`` dropped from the forwarded body), so this client serves behind either; the overlay
keeps 0.3.2 (docs/deployment.md says why).

``make_policy_client(url, engine_url=...)`` picks the class.
"""
from __future__ import annotations

import asyncio
from typing import Any

from ets.policy.client import PolicyClient, PolicyRequestError, SamplingParams, checked_url


class RoutedPolicyClient(PolicyClient):
    """The client behind sglang-router (``base_url``): tokenization and model info go to
    ``engine_url`` (one engine, any replica), every prompt of a batch is its own ``/generate``
    (so the router routes each by its own prefix), and readiness is the router's ``/readiness``
    (a healthy worker exists). Everything else is ``PolicyClient``'s."""

    _health_path = "/readiness"

    def _refused(self, status: int, body: str) -> bool:
        """Also the router's 500 ``call_upstream_request_error``: its engine was lost mid-call or is
        down (sglang-router 0.3.2 answers that, not a 502, whether the worker died during the
        request or before it; measured, docs/deployment.md "Policy replicas"). The call was not
        served: retried like a lost connection."""
        return super()._refused(status, body) or (status == 500 and "call_upstream_request_error" in body)

    def __init__(self, base_url: str, *, engine_url: str, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self.engine_url = checked_url("engine_url", engine_url)

    async def _generate(self, ids: list[list[int]], plist: list[SamplingParams], shared: bool, n: int,
                        timeout: float | None) -> list[Any]:
        """One ``/generate`` per prompt (single ``input_ids``, one parameter object: the router
        refuses per-prompt lists), all in flight at once; results in prompt order, ``n`` per
        prompt. The first failure cancels the others."""
        for p in plist:
            if p.logit_bias:
                raise PolicyRequestError("logit_bias: sglang-router 0.3.2 drops it from /generate; "
                                         "not supported behind the router")
        tasks = [
            asyncio.ensure_future(self._json("POST", "/generate", {"input_ids": row, "sampling_params": p.to_json(n)},
                                             timeout=timeout))
            for row, p in zip(ids, plist, strict=True)
        ]
        try:
            answers = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
        return [r for data in answers for r in (data if isinstance(data, list) else [data])]


def make_policy_client(base_url: str, *, engine_url: str | None = None, **kwargs: Any) -> PolicyClient:
    """``PolicyClient`` for one engine, ``RoutedPolicyClient`` when ``engine_url`` names the engine
    behind an sglang-router at ``base_url``."""
    if engine_url:
        return RoutedPolicyClient(base_url, engine_url=engine_url, **kwargs)
    return PolicyClient(base_url, **kwargs)
