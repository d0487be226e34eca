"""The ``sglang`` PRM backend: score through an SGLang server's native ``/generate``.

Owns two things:
- ``PrmSupervisor``: either starts a local SGLang PRM server (port 30001 by default) through
  ``ets.engine.launcher``/``ets.engine.process`` and restarts it with exponential backoff when it
  dies, or attaches to an already-running URL (``ETS_PRM_URL``; tests, k8s sidecars) and only
  watches its ``/health``. Either way it reports up/down so the gRPC health status follows it.
- ``SglangBackend``: scoring requests with no generation. Pair types (math-shepherd and rlhflow
  read "+"/"-", judge "Yes"/"No") ask for ``token_ids_logprob: [plus_id, minus_id]`` with
  ``max_new_tokens: 0``: the newest step
  is the prompt's next-token distribution (``output_token_ids_logprobs``), earlier steps come from
  ``input_token_ids_logprobs`` (element k predicts token ``logprob_start_len + k``).
  ``logprob_start_len`` is the first score position, because with ``return_logprob`` SGLang caps
  prefix-cache reuse at it: the question and the already-scored steps stay cached.
  llemma needs the vocabulary mean of the LM-head logits, which log-probabilities cannot give
  (the log-normaliser is unknown). SGLang does return the final (post-norm) hidden states with
  ``return_hidden_states`` when launched with ``--enable-return-hidden-states``; the mean logit
  is then ``h . mean_row(W_lm_head)``, with the head's mean row read once from the checkpoint.
  qwen-prm (a 2-class head) is not served by SGLang 0.5.23: refused at startup.
"""
from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import aiohttp

from ets.engine.launcher import LaunchConfig
from ets.engine.process import local_url
from ets.reward.adapters import AdapterError, EncodedTrajectory, PrmOptions, make_adapter
from ets.reward.backends import BackendUnavailable, ScoreOutcome, check_model_ref, pair_score, sigmoid

log = logging.getLogger(__name__)

SGLANG_TYPES = ("math-shepherd", "rlhflow", "llemma", "judge")
HIDDEN_STATES_FLAG = "--enable-return-hidden-states"


class PrmSupervisor:
    """Keeps an SGLang PRM server available: spawned (and restarted) or attached by URL."""

    def __init__(self, *, url: str | None = None, launch: LaunchConfig | None = None,
                 log_dir: str | Path = "/tmp/ets-reward-logs", start_timeout_s: float = 600.0,
                 poll_s: float = 0.5, health_every_s: float = 5.0, backoff_initial_s: float = 1.0,
                 backoff_max_s: float = 60.0, on_restart: Callable[[], None] | None = None) -> None:
        if (url is None) == (launch is None):
            raise ValueError("PrmSupervisor needs exactly one of url (attach) or launch (spawn)")
        self.launch = launch
        self.url = (url or local_url(launch)).rstrip("/")  # type: ignore[arg-type]
        self.log_dir = Path(log_dir)
        self.start_timeout_s = start_timeout_s
        self.poll_s = poll_s
        self.health_every_s = health_every_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.on_restart = on_restart
        self.process: Any = None  # ets.engine.process.SGLangProcess when spawned
        self.restarts = 0
        self._up = False
        self._listeners: list[Callable[[bool], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._session: aiohttp.ClientSession | None = None

    @property
    def spawned(self) -> bool:
        return self.launch is not None

    def add_listener(self, listener: Callable[[bool], None]) -> None:
        self._listeners.append(listener)

    def is_up(self) -> bool:
        return self._up

    def mark(self, up: bool) -> None:
        if up != self._up:
            self._up = up
            log.warning("PRM server %s is %s", self.url, "up" if up else "DOWN")
            for listener in self._listeners:
                listener(up)

    async def _probe(self, timeout: float = 10.0) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                return r.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def _spawn(self) -> None:
        from ets.engine.process import SGLangProcess

        assert self.launch is not None
        if self.process is not None:
            await self.process.stop_async(timeout=10.0)
        self.process = SGLangProcess.launch(
            self.launch, log_path=self.log_dir / f"prm-sglang-{self.launch.port}.log", name="prm-sglang"
        )
        await self.process.wait_healthy_async(timeout=self.start_timeout_s)

    async def start(self) -> None:
        """Spawn (or first-probe) the server; return once it is healthy. Spawn failures raise
        (with SGLang's log tail); an attached URL that is not up yet is waited for."""
        self._session = aiohttp.ClientSession()
        if self.spawned:
            await self._spawn()
        else:
            deadline = asyncio.get_running_loop().time() + self.start_timeout_s
            while not await self._probe():
                if asyncio.get_running_loop().time() > deadline:
                    raise BackendUnavailable(f"PRM server at {self.url} (ETS_PRM_URL) not healthy after "
                                             f"{self.start_timeout_s:.0f}s")
                await asyncio.sleep(self.poll_s)
        self.mark(True)
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="prm-supervisor")

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        next_health = loop.time() + self.health_every_s
        backoff = self.backoff_initial_s
        while not self._closed:
            await asyncio.sleep(self.poll_s)
            if self.spawned and (self.process is None or not self.process.is_alive()):
                self.mark(False)
                code = None if self.process is None else self.process.returncode
                log.error("PRM SGLang server exited (code %s); restarting in %.1fs", code, backoff)
                await asyncio.sleep(backoff)
                if self._closed:
                    return
                try:
                    self.restarts += 1
                    if self.on_restart is not None:
                        self.on_restart()
                    await self._spawn()
                    backoff = self.backoff_initial_s
                    self.mark(True)
                except Exception as exc:  # noqa: BLE001 - keep supervising, back off further
                    log.error("PRM SGLang restart failed: %s", str(exc).splitlines()[0])
                    backoff = min(backoff * 2, self.backoff_max_s)
                continue
            # Down: probe at the poll rate so recovery is seen quickly; up: every health_every_s.
            if not self._up or loop.time() >= next_health:
                next_health = loop.time() + self.health_every_s
                self.mark(await self._probe())

    async def post(self, path: str, body: dict[str, Any], timeout: float) -> Any:
        """POST JSON; connection failures mark the server down and raise BackendUnavailable."""
        if not self._up:
            raise BackendUnavailable(f"PRM server {self.url} is down" + (" (restarting)" if self.spawned else ""))
        assert self._session is not None
        try:
            async with self._session.post(f"{self.url}{path}", json=body,
                                          timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                text = await resp.text()
                if resp.status >= 500:
                    raise BackendUnavailable(f"PRM server {self.url}{path} answered {resp.status}: {text[:200]}")
                if resp.status != 200:
                    raise RuntimeError(
                        f"PRM server {self.url}{path} rejected the request ({resp.status}): {text[:300]}")
                if len(text) > 1 << 20:
                    # Hidden-state replies (llemma) can be megabytes: parse off the event loop.
                    return await asyncio.to_thread(json.loads, text)
                return json.loads(text)
        except (aiohttp.ClientConnectionError, ConnectionError) as exc:
            self.mark(False)
            raise BackendUnavailable(f"PRM server {self.url} unreachable: {exc}") from None
        except TimeoutError:
            raise BackendUnavailable(f"PRM server {self.url} timed out after {timeout:.0f}s") from None

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            # Its outcome (cancelled, or an error already reported) is not this caller's.
            await asyncio.gather(self._task, return_exceptions=True)
        if self.process is not None:
            await self.process.stop_async()
        if self._session is not None:
            await self._session.close()
        self.mark(False)


def load_head_mean(model_path: str) -> tuple[list[float], float]:
    """Mean row (and mean bias) of the checkpoint's LM head: sum_v (W_v . h) / V = mean_row . h.
    Reads only that tensor from the safetensors shards (tied heads use the input embedding)."""
    import torch
    from safetensors import safe_open

    if not Path(model_path).is_dir():
        # A hub id: fetch the same files SGLang loads (the weights are in the shared HF cache).
        from huggingface_hub import snapshot_download

        model_path = snapshot_download(model_path, allow_patterns=["*.safetensors", "config.json"])
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise AdapterError("ETS_PRM_MODEL", f"llemma on sglang needs the safetensors checkpoint in {model_path}")
    config = json.loads((Path(model_path) / "config.json").read_text())
    names = ["lm_head.weight"]
    if config.get("tie_word_embeddings"):
        names.append("model.embed_tokens.weight")
    weight = bias = None
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            keys = set(st.keys())
            for name in names:
                if weight is None and name in keys:
                    weight = st.get_tensor(name)
            if bias is None and "lm_head.bias" in keys:
                bias = st.get_tensor("lm_head.bias")
    if weight is None:
        raise AdapterError("ETS_PRM_MODEL", f"no LM head ({' / '.join(names)}) in {model_path}")
    mean_bias = float(bias.float().mean()) if bias is not None else 0.0
    return weight.to(torch.float32).mean(dim=0).tolist(), mean_bias


class SglangBackend:
    name = "sglang"

    def __init__(self, model_path: str, prm_type: str, supervisor: PrmSupervisor, *,
                 options: PrmOptions | None = None, request_timeout_s: float = 120.0,
                 reuse_prefix: bool = True) -> None:
        from transformers import AutoTokenizer

        if prm_type not in SGLANG_TYPES:
            if prm_type == "qwen-prm":
                raise AdapterError(
                    "ETS_PRM_BACKEND", "prm_type qwen-prm (a 2-class head, Qwen2ForProcessRewardModel) is not "
                    "served by SGLang 0.5.23; use ETS_PRM_BACKEND=transformers"
                )
            make_adapter(prm_type, None)  # raises the unknown-type error naming ETS_PRM_TYPE
        # The tokenizer is loaded here even when attaching by ETS_PRM_URL: scoring sends token ids.
        check_model_ref(model_path)
        self.model_path = model_path
        self.prm_type = prm_type
        self.supervisor = supervisor
        self.request_timeout_s = request_timeout_s
        # False = logprob_start_len 0 (every call recomputes the whole prompt): the naive way,
        # kept for bench/reward_scoring.py's comparison.
        self.reuse_prefix = reuse_prefix
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.adapter = make_adapter(prm_type, self.tokenizer, options)
        self.max_tokens = int(getattr(self.tokenizer, "model_max_length", 4096) or 4096)
        try:
            from transformers import AutoConfig

            limit = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
            if limit:
                self.max_tokens = min(self.max_tokens, int(limit))
        except (OSError, ValueError):
            pass
        self._head_mean: Any = None
        self._head_bias = 0.0
        if self.adapter.readout == "mean_logit":
            import torch

            mean, self._head_bias = load_head_mean(model_path)
            self._head_mean = torch.tensor(mean, dtype=torch.float32)
            if supervisor.launch is not None and HIDDEN_STATES_FLAG not in supervisor.launch.extra_args:
                supervisor.launch = supervisor.launch.replace(
                    extra_args=tuple(supervisor.launch.extra_args) + (HIDDEN_STATES_FLAG,)
                )

    async def start(self) -> None:
        await self.supervisor.start()
        if self.adapter.readout == "mean_logit":
            # An attached server launched without the flag answers without hidden states: say so now.
            probe = self.adapter.encode("1 + 1 = ?", ["2"])
            try:
                await self.score([probe], True)
            except RuntimeError as exc:
                raise AdapterError("ETS_PRM_URL", f"llemma on sglang needs the PRM server launched with "
                                   f"{HIDDEN_STATES_FLAG}: {exc}") from None

    def is_up(self) -> bool:
        return self.supervisor.is_up()

    def set_health_listener(self, listener: Callable[[bool], None]) -> None:
        self.supervisor.add_listener(listener)

    async def close(self) -> None:
        await self.supervisor.close()

    async def score(self, encoded: Sequence[EncodedTrajectory], last_step_only: bool) -> ScoreOutcome:
        if not encoded:
            return ScoreOutcome(scores=[])
        prompts = [list(e.last_step_prompt()) for e in encoded]
        wanted = [(e.score_positions[-1:] if last_step_only else e.score_positions) for e in encoded]
        starts = [w[0] for w in wanted] if self.reuse_prefix else [0] * len(wanted)
        body: dict[str, Any] = {
            "input_ids": prompts,
            "return_logprob": True,
            "logprob_start_len": starts,
        }
        if self.adapter.readout == "pair":
            body["sampling_params"] = {"max_new_tokens": 0}
            body["token_ids_logprob"] = [self.adapter.plus_id, self.adapter.minus_id]
        else:
            # Hidden states only come back when one token is generated (observed on 0.5.23); the
            # sampled token is discarded.
            body["sampling_params"] = {"max_new_tokens": 1, "temperature": 0.0}
            body["return_hidden_states"] = True
        outs = await self.supervisor.post("/generate", body, self.request_timeout_s)
        if isinstance(outs, dict):
            outs = [outs]
        if len(outs) != len(prompts):
            raise RuntimeError(f"SGLang returned {len(outs)} results for {len(prompts)} prompts")
        scores: list[list[float]] = []
        prompt_tokens = cached = 0
        for prompt, pos, start, out in zip(prompts, wanted, starts, outs, strict=True):
            meta = out["meta_info"]
            prompt_tokens += int(meta.get("prompt_tokens", len(prompt)))
            cached += int(meta.get("cached_tokens", 0) or 0)
            if self.adapter.readout == "pair":
                scores.append([self._pair_at(meta, prompt, p, start) for p in pos])
            else:
                scores.append(self._mean_logit_at(meta, prompt, pos))
        return ScoreOutcome(scores=scores, prompt_tokens=prompt_tokens, cached_tokens=cached)

    def _pair_at(self, meta: dict[str, Any], prompt: list[int], pos: int, start: int) -> float:
        # The output at position p predicts token p + 1: past the prompt's end that is the
        # next-token distribution, inside it input element (p + 1 - start).
        if pos == len(prompt) - 1:
            entry = meta["output_token_ids_logprobs"][0]
        else:
            entry = meta["input_token_ids_logprobs"][pos + 1 - start]
        if not entry:
            raise RuntimeError(f"SGLang returned no token_ids_logprob at position {pos}")
        lp = {int(tok): float(val) for val, tok, _ in entry}
        return pair_score(lp[self.adapter.plus_id], lp[self.adapter.minus_id])  # type: ignore[index]

    def _mean_logit_at(self, meta: dict[str, Any], prompt: list[int], positions: Sequence[int]) -> list[float]:
        import torch

        hs = meta.get("hidden_states")
        if not hs:
            raise RuntimeError("SGLang returned no hidden_states")
        rows = torch.tensor(hs[0], dtype=torch.float32).reshape(-1, self._head_mean.shape[0])
        # Rows cover the prompt tokens SGLang computed (the uncached tail), ending at the last one.
        first = len(prompt) - rows.shape[0]
        out = []
        for p in positions:
            if p < first:
                raise RuntimeError(f"SGLang returned hidden states from position {first}, score position is {p}")
            out.append(sigmoid(float(rows[p - first] @ self._head_mean) + self._head_bias))
        return out
