"""The scale-out overlay's router, for real: PyPI sglang-router 0.3.2
(``python -m sglang_router.launch_router --policy cache_aware``) in front of two real SGLang CPU
engines of the tiny policy model, driven by the project's own PolicyClient / SGLangStepGenerator /
run_search, with a real reward server (tiny PRM, transformers backend) scoring the steps.

What the router does with our requests (source: lightseekorg/smg at the "release 0.3.2" commit,
the crate the wheel is built from): ``route_typed_request`` (src/routers/http/router.rs) routes on
``GenerateRequest::extract_text_for_routing`` (src/protocols/generate.rs): ``text`` if given, else
the ``input_ids`` as decimal strings joined by spaces, a batch's prompts all concatenated into one
string. ``CacheAwarePolicy::select_worker`` (src/policies/cache_aware.rs) matches that string
against a per-worker character radix tree; at a match rate above ``--cache-threshold`` (0.3) it
picks the worker holding the match, else the least-loaded one (in-flight requests). So token ids
do steer routing, but only one prompt per request does: a batch of k prompts matches at most ~1/k
of its string. The router also has no ``/tokenize`` (404) and takes one ``sampling_params`` object
per request (a per-prompt list is a 422), and drops ``logit_bias``. Hence the client's routed mode
(``RoutedPolicyClient(router, engine_url=engine)``): tokenization on an engine, one ``/generate`` per
prompt.

Which engine served a request is read from the answer itself: each engine runs with its own
``--weight-version`` and SGLang echoes it in ``meta_info.weight_version``; the engines' own
``sglang:prompt_tokens_total`` / ``sglang:cached_tokens_total`` deltas must equal the per-engine
sums of those answers.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import aiohttp
import pytest

from ets.search.config import SearchConfig
from ets.engine.process import ServerProcess, free_port
from ets.policy.client import PolicyClient, PolicyRequestError, Sample, SamplingParams
from ets.policy.routed import RoutedPolicyClient
from ets.policy.generator import SGLangStepGenerator, tokenize_root
from ets.reward.client import RewardClient
from ets.search.loop import run_search
from reward_fixtures import ThreadedRewardServer, reward_config

# The first test's setup starts two SGLang engines (minutes each on a loaded machine).
pytestmark = [pytest.mark.sglang, pytest.mark.timeout(1200)]

WORKERS = ("engine-a", "engine-b")  # each engine's --weight-version: names it in every answer
ROUTER_START_TIMEOUT_S = 120.0

QUESTIONS = (
    "A farmer has 17 sheep and buys 3 more every week for 6 weeks. How many sheep does he have then?",
    "The sum of two consecutive odd integers is 76. What is the product of the two integers?",
    "A train leaves at 9:40 and travels 210 km at 84 km per hour. At what time does it arrive?",
    "If 5 pencils cost 1.35 dollars, how much do 12 pencils cost, in cents, at the same price each?",
)


@dataclass
class Router:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"


@pytest.fixture(scope="module")
def engines(sglang_servers: Any, tiny_model_factory: Callable[[str], Path]) -> Iterator[dict[str, ServerProcess]]:
    """Two real SGLang CPU engines of the tiny policy model, stopped at the end of the module."""
    model = tiny_model_factory("policy")
    procs: dict[str, ServerProcess] = {}
    try:
        for name in WORKERS:
            procs[name] = sglang_servers.get(model, extra_args=("--weight-version", name))
        yield procs
    finally:
        for proc in procs.values():
            sglang_servers.stop(proc)


def _get_json(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, None


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def router(engines: dict[str, ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    """The overlay's router (same policy and defaults; static worker list instead of pod
    discovery) on a free port, in its own process group, killed as a group at the end."""
    port, metrics_port = free_port(), free_port()
    log_path = tmp_path_factory.mktemp("router") / "router.log"
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
           "--policy", "cache_aware", "--worker-urls", *(engines[n].url for n in WORKERS),
           "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    r = Router(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path)
    try:
        deadline = time.monotonic() + ROUTER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"router exited with {proc.returncode}:\n{r.log_tail()}")
            try:
                status, body = _get_json(r.url + "/readiness")
            except OSError:
                status, body = 0, None
            if status == 200 and body and body.get("healthy_workers") == len(WORKERS):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"router not ready with both workers in {ROUTER_START_TIMEOUT_S}s "
                            f"(last: {status} {body}):\n{r.log_tail()}")
            time.sleep(0.5)
        yield r
    finally:
        _stop_group(proc)


def served_by(sample: Sample) -> str:
    return str(sample.meta["weight_version"])


_METRIC = re.compile(r"^(sglang:(?:prompt_tokens_total|cached_tokens_total))\{[^}]*\}\s+([0-9.e+]+)$", re.M)


async def engine_counters(engines: dict[str, ServerProcess]) -> dict[str, dict[str, float]]:
    """Per engine: its own prompt/cached token counters (summed over label sets)."""
    out: dict[str, dict[str, float]] = {}
    for name, proc in engines.items():
        async with PolicyClient(proc.url, timeout_s=60) as c:
            text = await c.metrics_text()
        totals = {"prompt": 0.0, "cached": 0.0}
        for metric, value in _METRIC.findall(text):
            totals["prompt" if metric.endswith("prompt_tokens_total") else "cached"] += float(value)
        out[name] = totals
    return out


class RecordingClient(RoutedPolicyClient):
    """The real client; keeps every (prompt ids, sample) it got back."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.record: list[tuple[tuple[int, ...], Sample]] = []

    async def generate(self, prompts: Sequence[Sequence[int]], params: Any, **kw: Any) -> list[list[Sample]]:
        out = await super().generate(prompts, params, **kw)
        for ids, samples in zip(prompts, out, strict=True):
            self.record.extend((tuple(ids), s) for s in samples)
        return out


@pytest.fixture(scope="module")
def reward_address(reward_servers: Callable[..., ThreadedRewardServer],
                   tiny_model_factory: Callable[[str], Path]) -> str:
    """A real reward server (tiny math-shepherd PRM on the transformers backend, MiniLM embedder)
    scores and embeds the searches' steps, as in the deployed stack."""
    return reward_servers(reward_config(tiny_model_factory("math-shepherd"), "math-shepherd", "transformers")).address


async def test_router_does_not_take_the_single_engine_wire_format(engines: dict[str, ServerProcess],
                                                                   router: Router) -> None:
    """What breaks when the search service talks to the router as if it were an engine."""
    engine = engines[WORKERS[0]]
    async with PolicyClient(router.url, timeout_s=120) as plain:
        # No /tokenize on the router: the search root cannot be tokenized through it.
        with pytest.raises(PolicyRequestError) as err:
            await plain.tokenize("What is 2 plus 2?\n")
        assert err.value.status == 404
        # The generator's batch (one sampling_params object per prompt) is rejected.
        with pytest.raises(PolicyRequestError) as err:
            await plain.generate([[5, 6, 7], [5, 6, 8]],
                                 [SamplingParams(max_new_tokens=4), SamplingParams(max_new_tokens=5)])
        assert err.value.status == 422 and "sampling_params" in err.value.message
    # logit_bias does not survive the router: a +100 bias makes the engine emit only that token.
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 8, "temperature": 1.0,
                                                        "logit_bias": {"300": 100.0}}}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        outs = {}
        for name, url in (("engine", engine.url), ("router", router.url)):
            async with http.post(url + "/generate", json=body) as resp:
                assert resp.status == 200, await resp.text()
                outs[name] = (await resp.json())["output_ids"]
    assert outs["engine"] == [300] * 8
    assert outs["router"] != [300] * 8
    # The routed client tokenizes on the engine and refuses what the router would drop.
    async with RoutedPolicyClient(router.url, engine_url=engine.url, timeout_s=120) as routed, \
            PolicyClient(engine.url, timeout_s=120) as direct:
        text = "What is 2 plus 2?\n"
        assert await routed.tokenize(text) == await direct.tokenize(text)
        assert await routed.health()
        with pytest.raises(PolicyRequestError, match="logit_bias"):
            await routed.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4, logit_bias={300: 5.0}))


async def test_searches_stay_on_the_engine_that_holds_their_prefix(engines: dict[str, ServerProcess],
                                                                   router: Router, reward_address: str) -> None:
    """Four ETS searches at once through the router, as the search service runs them (routed
    client, real generator, run_search): every request of a search lands on one engine, the
    searches are spread over both engines, and continuation prompts hit that engine's cache."""
    before = await engine_counters(engines)
    async with RecordingClient(router.url, engine_url=engines[WORKERS[0]].url, timeout_s=300) as client, \
            RewardClient(reward_address) as reward:
        scorer = reward  # the reward client is itself a StepScorer
        roots = [await tokenize_root(client, q, "math-shepherd") for q in QUESTIONS]
        config = SearchConfig(method="ets", width=4, max_step_tokens=12, max_depth=3, max_tokens=1024,
                              temperature=1.0, seed=11)
        results = await asyncio.gather(*(
            run_search(root, config, SGLangStepGenerator(client, "math-shepherd"), scorer) for root in roots
        ))
        record = list(client.record)
    after = await engine_counters(engines)

    per_question: dict[int, list[tuple[tuple[int, ...], Sample]]] = {i: [] for i in range(len(roots))}
    for ids, s in record:
        owners = [i for i, r in enumerate(roots) if ids[:len(r.prompt_ids)] == tuple(r.prompt_ids)]
        assert len(owners) == 1
        per_question[owners[0]].append((ids, s))

    lines = []
    served: dict[str, int] = {}
    for i, rows in per_question.items():
        root_len = len(roots[i].prompt_ids)
        workers = {served_by(s) for _, s in rows}
        cont = [s for ids, s in rows if len(ids) > root_len]
        prompt = sum(s.prompt_tokens for s in cont)
        cached = sum(s.cached_tokens for s in cont)
        depths = results[i].stats.depth_reached
        lines.append(f"q{i}: root {root_len} tok, {len(rows)} requests ({len(cont)} continuations), depth {depths}, "
                     f"engines {sorted(workers)}, continuation cached/prompt {cached}/{prompt}")
        for w in workers:
            served[w] = served.get(w, 0) + 1
        assert len(workers) == 1, lines[-1]
        assert depths >= 2 and len(cont) >= 4, lines[-1]
        # Each continuation finds its whole prefix (parent prompt and step, all but the last
        # sampled token) in that engine's radix cache.
        assert all(s.cached_tokens >= s.prompt_tokens - 1 for s in cont), lines[-1]
    print("\n".join(lines))
    print("searches per engine:", served)
    assert set(served) == set(WORKERS), f"all searches on one engine: {served}"

    # The attribution is the engines' own: per-engine sums of the answers equal their counters.
    for name in WORKERS:
        samples = [s for _, s in record if served_by(s) == name]
        dp = after[name]["prompt"] - before[name]["prompt"]
        dc = after[name]["cached"] - before[name]["cached"]
        print(f"{name}: {len(samples)} requests, prompt tokens {dp:.0f}, cached {dc:.0f} ({dc / max(dp, 1):.2f})")
        assert dp == sum(s.prompt_tokens for s in samples)
        assert dc == sum(s.cached_tokens for s in samples)


async def test_prefix_affinity_beats_load_only_for_one_prompt_per_request(engines: dict[str, ServerProcess],
                                                                          router: Router) -> None:
    """The mechanism, deterministically: while the engine holding a question's prefix is busy
    (one long request in flight, so it is the more loaded one), a continuation sent alone still
    goes there (prefix match above the threshold); the same continuation as a batch of 4 (the
    only batch form the router accepts: one shared sampling_params) goes to the idle engine."""
    engine = engines[WORKERS[0]]
    question = "A rectangle is 3 times as long as it is wide and its perimeter is 96 cm. What is its area?"
    async with RoutedPolicyClient(router.url, engine_url=engine.url, timeout_s=300) as client, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        root = list((await tokenize_root(client, question, "math-shepherd")).prompt_ids)
        [first] = await client.generate_one(root, SamplingParams(max_new_tokens=12))
        home = served_by(first)
        other = next(w for w in WORKERS if w != home)
        child = root + list(first.output_ids)

        # Busy the home engine through the router: shares the root, so it is routed there too.
        busy = asyncio.ensure_future(client.generate_one(
            root + [300, 301], SamplingParams(max_new_tokens=3000, ignore_eos=True)))
        try:
            deadline = time.monotonic() + 60
            while not await _running(http, engines[home].url):
                assert not busy.done() and time.monotonic() < deadline, "the long request never ran on its engine"
                await asyncio.sleep(0.2)

            # One prompt per request (the routed client): routed by the prefix, to the busy engine.
            alone = await client.generate_one(child, SamplingParams(max_new_tokens=4), n=1)
            alone += [s for [s] in await client.generate([child] * 3, SamplingParams(max_new_tokens=4))]
            # The same continuation as one batch: routed to the least-loaded engine instead.
            payload = {"input_ids": [child] * 4, "sampling_params": {"max_new_tokens": 4, "temperature": 1.0}}
            async with http.post(router.url + "/generate", json=payload) as resp:
                assert resp.status == 200, await resp.text()
                batch = await resp.json()
            assert not busy.done(), "the long request ended early; the load test proves nothing"
        finally:
            busy.cancel()
            await asyncio.gather(busy, return_exceptions=True)
            await _wait_idle(http, engines[home].url)

    assert [served_by(s) for s in alone] == [home] * 4
    assert all(s.cached_tokens >= len(child) - 1 for s in alone), [s.cached_tokens for s in alone]
    assert [r["meta_info"]["weight_version"] for r in batch] == [other] * 4
    # The idle engine never saw this question: the batch's first prefill starts from scratch.
    assert min(r["meta_info"]["cached_tokens"] for r in batch) < len(root) // 2
    print(f"home {home}: alone cached {[s.cached_tokens for s in alone]} of {len(child)}; "
          f"batch on {other}: cached {[r['meta_info']['cached_tokens'] for r in batch]}")


async def _running(http: aiohttp.ClientSession, engine_url: str) -> bool:
    async with http.get(engine_url + "/metrics") as resp:
        text = await resp.text()
    return any(float(v) >= 1 for v in re.findall(r"^sglang:num_running_reqs\{[^}]*\}\s+([0-9.e+]+)$", text, re.M))


async def _wait_idle(http: aiohttp.ClientSession, engine_url: str, timeout: float = 120.0) -> None:
    """After cancelling the long request: wait until its engine stops running it (the router may
    let it run to completion), so later tests see quiet engines."""
    deadline = time.monotonic() + timeout
    while await _running(http, engine_url) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
