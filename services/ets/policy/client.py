"""Async client for SGLang's native HTTP API (``/generate``, ``/tokenize``, ``/health``, ``/model_info``).

Owns the wire format and its failure modes, nothing about search:
- token-exact generation: prompts go in as ``input_ids`` and each sample comes back with the new
  ``output_ids`` exactly as the engine holds them in its KV cache (stop-string tokens included,
  even when the text is trimmed), so a child's ids (parent ids + output ids) always hit the radix
  cache; text is never re-tokenised;
- batched prompts with ``n`` samples each (SGLang returns them prompt-major) or one sampling
  parameter set per prompt;
- finish reasons: a stop string / stop token matched -> "stop", end of sequence -> "eos",
  ``max_new_tokens`` reached -> "length";
- the engine's own accounting per sample (``prompt_tokens``, ``completion_tokens``,
  ``cached_tokens``);
- errors: 4xx -> ``PolicyRequestError`` carrying the server's message; connection failures and
  502 / 503 / 504 (starting, overloaded, behind a restarting proxy) of idempotent calls (every
  call but ``flush_cache``) are retried with capped exponential backoff (``ets.retry``: within a
  search until its deadline would pass, else a bounded count), then ``PolicyUnavailable``; other
  5xx -> ``PolicyServerError`` at once; a request timeout raises ``PolicyUnavailable`` at once
  (the server may still be working on it).

Inputs are checked before they are sent: an out-of-vocabulary token id crashes SGLang 0.5.23's
scheduler (IndexError in the embedding, the whole server exits), so ids are range-checked when the
vocabulary size is known.

Behind sglang-router (the k8s scale-out overlay) the wire format differs in three places:
``ets.policy.routed.RoutedPolicyClient`` overrides exactly those (``_generate``, ``engine_url``,
``_health_path``) and shares everything else here.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal, Mapping, Self, Sequence

import aiohttp

from ets.retry import Retries, RetryPolicy, current_window

Finish = Literal["stop", "eos", "length"]

# Statuses worth retrying: the server is starting, overloaded or behind a restarting proxy.
_RETRY_STATUSES = frozenset({502, 503, 504})
# Four tries, waiting up to 0.2, 0.4 and 0.8 s between them (jittered down to half; capped at 3 s).
DEFAULT_RETRY = RetryPolicy(max_retries=3, initial_backoff_s=0.2, max_backoff_s=3.0)


class PolicyError(Exception):
    """Base class of policy-client errors."""


class PolicyUnavailable(PolicyError):
    """The policy server could not be reached (after retries) or did not answer in time."""


class PolicyRequestError(PolicyError):
    """The server (or the client's own checks) rejected the request; ``message`` says why."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(f"policy request rejected ({status or 'client check'}): {message}")
        self.message = message
        self.status = status


class PolicyServerError(PolicyError):
    """The server failed on a valid request (5xx other than the retried ones, or a bad body)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(f"policy server error ({status}): {message}")
        self.message = message
        self.status = status


@dataclass(frozen=True)
class SamplingParams:
    """SGLang sampling parameters we use (``sampling_params`` of ``/generate``)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    # Keep the matched stop string at the end of ``text`` (the ids always contain it).
    no_stop_trim: bool = False
    # Per-request seed; SGLang only honours it with --enable-deterministic-inference.
    seed: int | None = None
    # Structured output (grammar backend): at most one of these.
    regex: str | None = None
    json_schema: str | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool | None = None
    # token id -> additive logit bias (steers format, e.g. toward a step tag).
    logit_bias: Mapping[int, float] | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise PolicyRequestError(f"max_new_tokens: must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise PolicyRequestError(f"temperature: must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise PolicyRequestError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.regex is not None and self.json_schema is not None:
            raise PolicyRequestError("regex/json_schema: give at most one constraint")
        if any(not s for s in self.stop):
            raise PolicyRequestError("stop: empty stop string")

    def to_json(self, n: int = 1) -> dict[str, Any]:
        out: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature}
        if n != 1:
            out["n"] = n
        if self.top_p is not None:
            out["top_p"] = self.top_p
        if self.top_k is not None:
            out["top_k"] = self.top_k
        if self.stop:
            out["stop"] = list(self.stop)
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        if self.no_stop_trim:
            out["no_stop_trim"] = True
        if self.seed is not None:
            out["sampling_seed"] = self.seed
        if self.regex is not None:
            out["regex"] = self.regex
        if self.json_schema is not None:
            out["json_schema"] = self.json_schema
        if self.ignore_eos:
            out["ignore_eos"] = True
        if self.skip_special_tokens is not None:
            out["skip_special_tokens"] = self.skip_special_tokens
        if self.logit_bias:
            out["logit_bias"] = {str(int(k)): float(v) for k, v in self.logit_bias.items()}
        return out


@dataclass(frozen=True)
class Sample:
    """One sampled continuation and the engine's accounting of its request."""

    output_ids: tuple[int, ...]
    text: str
    finish: Finish
    # The stop string or token id that matched ("stop"), the eos id ("eos"), else None.
    matched: str | int | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    e2e_latency_s: float | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


def parse_sample(obj: Mapping[str, Any], stop_token_ids: Sequence[int] = ()) -> Sample:
    """Turn one ``/generate`` result object into a ``Sample``."""
    try:
        meta = obj["meta_info"]
        reason = meta.get("finish_reason") or {}
        output_ids = tuple(int(t) for t in obj.get("output_ids") or ())
        text = obj.get("text", "")
        kind = reason.get("type")
        matched = reason.get("matched")
        finish: Finish
        if kind == "length":
            finish = "length"
        elif kind == "stop":
            # A string match is a stop string; an int is either one of our stop tokens or the
            # model's end-of-sequence (SGLang reports both as type "stop" with the token id).
            if isinstance(matched, str) or (isinstance(matched, int) and matched in stop_token_ids):
                finish = "stop"
            else:
                finish = "eos"
        elif kind == "abort":
            raise PolicyRequestError(str(reason.get("message") or "request aborted by the server"),
                                     reason.get("status_code"))
        else:
            raise PolicyServerError(f"unexpected finish_reason {reason!r}")
        return Sample(
            output_ids=output_ids, text=text, finish=finish, matched=matched,
            prompt_tokens=int(meta.get("prompt_tokens", 0)),
            completion_tokens=int(meta.get("completion_tokens", len(output_ids))),
            cached_tokens=int(meta.get("cached_tokens", 0)),
            e2e_latency_s=meta.get("e2e_latency"), meta=meta,
        )
    except (KeyError, TypeError, ValueError) as exc:  # PolicyErrors raised above pass through
        raise PolicyServerError(f"malformed /generate result: {exc!r}") from exc


def _error_message(body: str) -> str:
    """SGLang's error bodies: {"error": "..."}, {"error": {"message": ...}}, {"message": ...}."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip() or "<empty body>"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)
        if isinstance(err, str):
            return err
        if "detail" in data:
            return str(data["detail"])
    return str(data)


class PolicyClient:
    """Async client of one SGLang server. Use as ``async with PolicyClient(url) as client``
    (or call ``close()``); one aiohttp session per client, connections kept alive."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        vocab_size: int | None = None,
        max_connections: int = 64,
        session: aiohttp.ClientSession | None = None,
        api_key: str | None = None,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self.base_url = checked_url("base_url", base_url)
        # SGLang's --api-key: sent as a bearer token on every call, so engines can require one.
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        # Where calls go that only an engine answers (tokenization, model info): the server itself.
        self.engine_url = self.base_url
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)
        self.retry = retry or DEFAULT_RETRY
        self.vocab_size = vocab_size
        # Called with the failure's kind ("connect", "disconnect", "http_503", ...) before each retry.
        self.on_retry = on_retry
        self._max_connections = max_connections
        # A caller-owned session (shared connection pool) is used as is and never closed here.
        self._session: aiohttp.ClientSession | None = session
        self._owns_session = session is None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None and not self._session.closed:
            await self._session.close()
        if self._owns_session:
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if not self._owns_session:
                raise PolicyUnavailable("the shared HTTP session of this policy client is closed")
            self._session = aiohttp.ClientSession(
                timeout=self.timeout, connector=aiohttp.TCPConnector(limit=self._max_connections)
            )
        return self._session

    # -- transport ---------------------------------------------------------------------------
    # Readiness: SGLang's /health runs a one-token generation (fails while the engine cannot serve).
    _health_path = "/health"

    async def _request(self, method: str, path: str, payload: Any = None, *, timeout: float | None = None,
                       retries: int | None = None, engine: bool = False, idempotent: bool = True) -> tuple[int, str]:
        """One call with retries (``ets.retry``: until the search's ``RetryWindow`` closes, else the
        client's ``RetryPolicy``); returns (status, body) for statuses not retried.

        Retried: a connection that could not be made or timed out while connecting (nothing was
        sent: any call), and for ``idempotent`` calls also a connection lost mid-call (or mid-body)
        and 502 / 503 / 504 (the server or a proxy refused or lost it). A request timeout is not
        retried (the server may still be working on it). ``retries``: at most this many (0: one
        try). ``engine``: send it to ``engine_url`` (calls a router does not proxy)."""
        url = (self.engine_url if engine else self.base_url) + path
        policy = self.retry if retries is None else replace(self.retry, max_retries=retries)
        state = Retries(policy, window=None if retries is not None else current_window())
        last: str = ""
        # Always per request: a shared session may carry no timeout of its own.
        req_timeout = aiohttp.ClientTimeout(total=timeout or self.timeout.total, sock_connect=self.timeout.sock_connect)
        while True:
            try:
                session = self._get_session()
                async with session.request(method, url, json=payload, timeout=req_timeout,
                                           headers=self._headers) as resp:
                    body = await resp.text()
                    if idempotent and self._refused(resp.status, body):
                        last = f"HTTP {resp.status}: {_error_message(body)}"
                        kind = f"http_{resp.status}"
                    else:
                        return resp.status, body
            except aiohttp.ConnectionTimeoutError as exc:
                # Caught before TimeoutError (it is one): the connection was never made, so nothing
                # was sent and any call may be retried. A restarting or overloaded engine whose
                # accept queue is full drops new connections until the connect timeout passes.
                last, kind = f"{type(exc).__name__}: {exc}", "connect_timeout"
            except TimeoutError:
                raise PolicyUnavailable(
                    f"{method} {url} timed out after {timeout or self.timeout.total}s"
                ) from None
            except aiohttp.ClientConnectorError as exc:  # never connected: nothing was sent
                last, kind = f"{type(exc).__name__}: {exc}", "connect"
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                # Lost mid-call (before or while the answer's body arrived): the server may have acted.
                if not idempotent:
                    raise PolicyUnavailable(f"{method} {url} lost mid-call (not retried): "
                                            f"{type(exc).__name__}: {exc}") from None
                last, kind = f"{type(exc).__name__}: {exc}", "disconnect"
            wait = state.next_wait()
            if wait is None:
                raise PolicyUnavailable(f"{method} {url} failed {state.gave_up()}: {last}")
            if self.on_retry is not None:
                self.on_retry(kind)
            await asyncio.sleep(wait)

    def _refused(self, status: int, body: str) -> bool:
        """Whether an answer says the call was not served (worth another try): 502 / 503 / 504."""
        return status in _RETRY_STATUSES

    async def _json(self, method: str, path: str, payload: Any = None, **kw: Any) -> Any:
        return decoded(path, *await self._request(method, path, payload, **kw))

    # -- generation --------------------------------------------------------------------------
    def _check_prompts(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not prompts:
            raise PolicyRequestError("input_ids: need a non-empty list of token-id lists")
        out: list[list[int]] = []
        for i, ids in enumerate(prompts):
            if isinstance(ids, (str, bytes)) or len(ids) == 0:
                raise PolicyRequestError(f"input_ids[{i}]: empty or not a token-id list")
            row = []
            for j, t in enumerate(ids):
                if not isinstance(t, int) or isinstance(t, bool):
                    raise PolicyRequestError(f"input_ids[{i}][{j}]: token ids are ints, got {t!r}")
                if t < 0 or (self.vocab_size is not None and t >= self.vocab_size):
                    raise PolicyRequestError(
                        f"input_ids[{i}][{j}]: token id {t} outside the vocabulary "
                        f"[0, {self.vocab_size if self.vocab_size is not None else 'inf'})"
                    )
                row.append(t)
            out.append(row)
        return out

    async def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        *,
        n: int = 1,
        timeout: float | None = None,
    ) -> list[list[Sample]]:
        """Sample ``n`` continuations of each prompt in one ``/generate`` call.

        ``params`` is one set for all prompts or one per prompt (SGLang requires the same ``n``
        for all prompts of a batch). Returns, per prompt in order, its ``n`` samples."""
        if n < 1:
            raise PolicyRequestError(f"n: must be >= 1, got {n}")
        ids = self._check_prompts(prompts)
        shared = isinstance(params, SamplingParams)
        plist = [params] * len(ids) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(ids):
            raise PolicyRequestError(f"sampling_params: {len(plist)} sets for {len(ids)} prompts")
        for p in plist:
            p.validate()
        if n > 1 and any(p.seed is not None for p in plist):
            # Same seed for all n samples would make them identical under deterministic inference.
            raise PolicyRequestError("sampling_seed: with n > 1 give one prompt per sample and distinct seeds")
        results = await self._generate(ids, plist, shared, n, timeout)
        if len(results) != len(ids) * n:
            raise PolicyServerError(f"expected {len(ids) * n} results, got {len(results)}")
        out: list[list[Sample]] = []
        # Observed on 0.5.23: a batch with n > 1 comes back prompt-major (p0s0, p0s1, p1s0, ...).
        for i, p in enumerate(plist):
            out.append([parse_sample(r, p.stop_token_ids) for r in results[i * n:(i + 1) * n]])
        return out

    async def _generate(self, ids: list[list[int]], plist: list[SamplingParams], shared: bool, n: int,
                        timeout: float | None) -> list[Any]:
        """The raw result objects of one batched ``/generate`` (prompt-major, ``n`` per prompt)."""
        sp: Any = plist[0].to_json(n) if shared else [p.to_json(n) for p in plist]
        # The hot path: straight to the wire (no _json hop), decoded when it answers.
        data = decoded("/generate", *await self._request(
            "POST", "/generate", {"input_ids": ids, "sampling_params": sp}, timeout=timeout))
        return data if isinstance(data, list) else [data]

    async def generate_one(self, prompt: Sequence[int], params: SamplingParams, *, n: int = 1) -> list[Sample]:
        return (await self.generate([prompt], params, n=n))[0]

    # -- tokenisation and info ---------------------------------------------------------------
    async def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` with the server's own tokenizer (``POST /tokenize``)."""
        data = await self._json("POST", "/tokenize", {"prompt": text, "add_special_tokens": add_special_tokens},
                                engine=True)
        return [int(t) for t in data["tokens"]]

    async def tokenize_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of chat ``messages`` rendered with the server's chat template, generation
        prompt appended (the root of a chat-style policy)."""
        data = await self._json(
            "POST", "/tokenize",
            {"messages": list(messages), "add_generation_prompt": True, "add_special_tokens": False}, engine=True,
        )
        return [int(t) for t in data["tokens"]]

    async def model_info(self) -> dict[str, Any]:
        return dict(await self._json("GET", "/model_info", engine=True))

    async def health(self, timeout: float = 10.0) -> bool:
        """True when the server's readiness path answers 200 (one try, no retries)."""
        try:
            status, _ = await self._request("GET", self._health_path, timeout=timeout, retries=0)
        except PolicyUnavailable:
            return False
        return status == 200

    async def flush_cache(self) -> None:
        # Not idempotent in effect (a retry after a lost answer would flush what was cached since).
        status, body = await self._request("POST", "/flush_cache", idempotent=False)
        if status >= 400:
            raise PolicyServerError(_error_message(body), status)

    async def metrics_text(self) -> str:
        status, body = await self._request("GET", "/metrics")
        if status >= 400:
            raise PolicyServerError(_error_message(body), status)
        return body


def decoded(path: str, status: int, body: str) -> Any:
    """An answer's JSON; 4xx -> ``PolicyRequestError``, 5xx or a body that is not JSON ->
    ``PolicyServerError`` (the server's message in both)."""
    if 400 <= status < 500:
        raise PolicyRequestError(_error_message(body), status)
    if status >= 500:
        raise PolicyServerError(_error_message(body), status)
    try:
        return json.loads(body)
    except ValueError as exc:
        raise PolicyServerError(f"non-JSON answer from {path}: {body[:200]!r}", status) from exc


def checked_url(name: str, url: str) -> str:
    """``url`` without its trailing slash; ValueError naming ``name`` unless it is http(s)."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{name}: expected http(s)://host:port, got {url!r}")
    return url.rstrip("/")
