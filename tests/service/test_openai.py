"""The OpenAI-compatible front door in-process: the real search server (gRPC and HTTP transports in
one event loop, uvicorn on loopback) over scripted upstreams (``ets.testing.upstreams``), called
with the official ``openai`` package (sync and async, streaming and not), httpx and curl. The
same searches through gRPC give the same answers; every error status; a disconnect stops the
search. The real CPU stack's check is tests/stack/test_openai.py."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Sequence

import grpc
import httpx
import openai
import pytest

from ets.api.v1 import search_pb2
from ets.service.openai_request import METHOD_ALIASES, parse_chat
from ets.service.request import RequestError
from ets.service.server import SearchServer
from ets.service.status import UpstreamUnavailable
from ets.testing.inprocess import PROBLEM, Harness, harness_of
from ets.testing.upstreams import PROMPT, ScriptedUpstreams, Spec
from tools import free_port, tool

SCRIPT: dict[tuple[str, ...], Sequence[Spec]] = {
    (): [("s1 ки", 5, "step"), ("t1 ки", 5, "step")],
    ("s1 ки",): [("s2 ки", 5, "step")],
    ("s1 ки", "s2 ки"): [("The answer is 3 ки", 5, "step")],
    ("t1 ки",): [("The answer is 4 ки", 5, "step")],
}
SCORES = {"The answer is 3": 0.9, "The answer is 4": 0.2, "t1": 0.3}
TOKEN = "s3cret-token"
MESSAGES: list[Any] = [{"role": "user", "content": PROBLEM}]


class OpenAIHarness(Harness):
    """The in-process service with its OpenAI port, and the official clients (sync and async)."""

    api = "openai"

    def __init__(self, server: SearchServer, upstreams: ScriptedUpstreams, channel: grpc.aio.Channel) -> None:
        super().__init__(server, upstreams, channel)
        assert server.openai is not None
        self.base_url = f"http://127.0.0.1:{server.openai.port}/v1"
        token_file = server.settings.auth_token_file
        api_key = Path(token_file).read_text().strip() if token_file else "unused"
        # No retries: each test sees the first answer (the client would retry 429/503).
        self.client = openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0)
        self.sync = openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0)

    async def aclose(self) -> None:
        await self.client.close()
        self.sync.close()


@pytest.fixture()
def harness_options() -> dict[str, Any]:
    """``svc`` and ``tight`` (tests/support/service_fixtures.py) with this module's two-answer script."""
    return {"kind": OpenAIHarness, "script": SCRIPT, "scores": SCORES, "openai_port": free_port()}


async def grpc_search(h: Harness, **config: Any) -> search_pb2.SearchResponse:
    return await h.stub.Search(search_pb2.SearchRequest(problem=PROBLEM, config=search_pb2.SearchConfig(**config)),
                               timeout=10)


def ets_of(obj: Any) -> dict[str, Any]:
    """The ``ets`` object of an openai response or chunk (an extra field the models keep)."""
    extra = obj.model_extra or {}
    assert "ets" in extra, obj
    return dict(extra["ets"])


# ---- searches --------------------------------------------------------------------------------------

async def test_async_client_extra_body_equals_grpc_search(svc: OpenAIHarness) -> None:
    reply = await svc.client.chat.completions.create(
        model="scripted-policy-model", messages=MESSAGES, seed=7,
        extra_body={"ets": {"method": "ets", "width": 4, "lambda_c": 0.5, "candidates": True}})
    ets = ets_of(reply)
    expected = await grpc_search(svc, method="ets", width=4, lambda_c=0.5, seed=7)
    assert ets["answer"] == expected.answer == "3"
    assert reply.choices[0].message.content == expected.best.text
    assert reply.choices[0].message.content.endswith("The answer is 3 ки")
    assert reply.choices[0].finish_reason == "stop" and reply.model == "scripted-policy-model"
    assert ets["config"]["method"] == "ets" and ets["config"]["width"] == 4 and ets["config"]["seed"] == 7
    assert ets["config"]["lambda_c"] == 0.5 and ets["config"]["lambda_s"] == expected.config.lambda_s
    assert ets["stats"]["model_calls"] == expected.stats.model_calls
    assert ets["stats"]["generated_tokens"] == expected.stats.generated_tokens
    assert [c["text"] for c in ets["candidates"]] == [c.text for c in expected.candidates]
    assert [c["aggregate_score"] for c in ets["candidates"]] == pytest.approx(
        [c.aggregate_score for c in expected.candidates])
    # usage: the whole search, every prompt sent to the policy and every generated token.
    assert reply.usage is not None
    assert reply.usage.completion_tokens == expected.stats.generated_tokens
    assert reply.usage.prompt_tokens == expected.stats.prompt_tokens
    assert reply.usage.total_tokens == expected.stats.prompt_tokens + expected.stats.generated_tokens
    assert reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == expected.stats.cached_prompt_tokens
    await svc.idle()
    assert svc.outcomes(method="ets")["ok"] == 1 and svc.outcomes("grpc", method="ets")["ok"] == 1


async def test_sync_client_with_headers_and_body_precedence(svc: OpenAIHarness) -> None:
    def call(**kwargs: Any) -> Any:
        return svc.sync.chat.completions.create(model="scripted-policy-model", messages=MESSAGES, **kwargs)

    headers = {"X-ETS-Method": "beam", "X-ETS-Width": "3", "X-ETS-Lambda_C": "0.25", "X-ETS-Seed": "5"}
    by_header = await asyncio.to_thread(call, extra_headers=headers)
    config = ets_of(by_header)["config"]
    assert (config["method"], config["width"], config["lambda_c"], config["seed"]) == ("beam", 3, 0.25, 5)
    expected = await grpc_search(svc, method="beam", width=3, lambda_c=0.25, seed=5)
    assert ets_of(by_header)["answer"] == expected.answer
    assert by_header.choices[0].message.content == expected.best.text
    # The body wins over headers (ets object and top-level seed); headers over the server defaults.
    both = await asyncio.to_thread(call, extra_headers=headers, seed=9, extra_body={"ets": {"width": 2}})
    config = ets_of(both)["config"]
    assert (config["method"], config["width"], config["seed"]) == ("beam", 2, 9)


async def test_method_alias_as_model(svc: OpenAIHarness) -> None:
    listed = [m.id async for m in svc.client.models.list()]
    assert listed == ["scripted-policy-model", *METHOD_ALIASES]
    assert set(METHOD_ALIASES) == {"ets", "rebase", "beam", "dvts", "best_of_n"}
    reply = await svc.client.chat.completions.create(model="dvts", messages=MESSAGES, seed=3)
    ets = ets_of(reply)
    assert reply.model == "dvts" and ets["config"]["method"] == "dvts"
    expected = await grpc_search(svc, method="dvts", seed=3)
    assert ets["answer"] == expected.answer and reply.choices[0].message.content == expected.best.text


async def test_async_stream_progress_content_usage_done(svc: OpenAIHarness) -> None:
    stream = await svc.client.chat.completions.create(
        model="rebase", messages=MESSAGES, stream=True, stream_options={"include_usage": True}, seed=1)
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    progress = [ets_of(c)["progress"] for c in chunks if (c.model_extra or {}).get("ets", {}).get("progress")]
    assert [p["depth"] for p in progress] == [0, 1, 2]
    assert all(c.choices[0].delta.content in (None, "") for c in chunks
               if (c.model_extra or {}).get("ets", {}).get("progress"))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = await grpc_search(svc, seed=1)
    assert content == expected.best.text
    stop = [c for c in chunks if c.choices and c.choices[0].finish_reason == "stop"]
    assert len(stop) == 1 and ets_of(stop[0])["answer"] == expected.answer == "3"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == expected.stats.generated_tokens
    await svc.idle()
    assert svc.outcomes()["ok"] == 1


async def test_sync_stream(svc: OpenAIHarness) -> None:
    def run() -> list[Any]:
        stream = svc.sync.chat.completions.create(model="scripted-policy-model", messages=MESSAGES, stream=True,
                                                  extra_headers={"X-ETS-Width": "2"})
        return list(stream)

    chunks = await asyncio.to_thread(run)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.endswith("The answer is 3 ки")
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage is None  # no include_usage


async def test_curl_sees_raw_server_sent_events(svc: OpenAIHarness) -> None:
    body = json.dumps({"model": "rebase", "messages": MESSAGES, "stream": True})
    proc = await asyncio.create_subprocess_exec(
        tool("curl"), "-sS", "-N", "--max-time", "20", "-H", "Content-Type: application/json",
        "-H", "X-ETS-Seed: 1", "-d", body, f"{svc.base_url}/chat/completions",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    events = [e for e in out.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    assert [p["ets"]["progress"]["depth"] for p in payloads if "progress" in p.get("ets", {})] == [0, 1, 2]
    assert payloads[-1]["choices"][0]["finish_reason"] == "stop" and payloads[-1]["ets"]["answer"] == "3"


async def test_system_message_and_new_token_budget(svc: OpenAIHarness) -> None:
    system = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    # math-shepherd (the default policy model type) has no chat template: the prompt is not used.
    reply = await svc.client.chat.completions.create(model="rebase", messages=system, max_tokens=12)
    ets = ets_of(reply)
    assert ets["system_prompt"].startswith("not used: policy model type 'math-shepherd'")
    # OpenAI's max_tokens counts new tokens per trajectory; ours counts the root prompt too.
    assert ets["config"]["max_tokens"] == len(PROMPT) + 12
    assert all(c["tokens"] <= len(PROMPT) + 12 for c in ets_of(await svc.client.chat.completions.create(
        model="rebase", messages=MESSAGES, max_completion_tokens=12, extra_body={"ets": {"candidates": True}}))[
        "candidates"])
    chat_type = await svc.client.chat.completions.create(
        model="rebase", messages=system, extra_body={"ets": {"policy_model_type": "llama-instruct"}})
    assert ets_of(chat_type)["system_prompt"] == "applied"
    assert svc.upstreams.system_prompts == ["Be brief.", None, "Be brief."]


# ---- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "param", "text"), [
    ({"extra_body": {"ets": {"widht": 4}}}, "ets.widht", "unknown search field"),
    ({"extra_body": {"ets": {"width": 0}}}, "ets.width", "ets.width: "),
    ({"extra_body": {"ets": {"width": "wide"}}}, "ets.width", "must be an integer"),
    ({"extra_headers": {"X-ETS-Width": "0"}}, "X-ETS-Width", "X-ETS-Width: "),
    ({"extra_headers": {"X-ETS-Widht": "4"}}, "X-ETS-Widht", "unknown search field"),
    ({"n": 2}, "n", "a search returns one answer"),
    ({"model": "gpt-4o"}, "model", "unknown model 'gpt-4o'"),
    ({"temperature": 0.5, "extra_body": {"ets": {"temperature": 0.7}}}, "ets.temperature", "conflicts"),
    # OpenAI's documented range (its API refuses 9 too): not sampled at 9.
    ({"temperature": 9}, "temperature", "must be at most 2 (OpenAI's range), got 9"),
    ({"temperature": -0.5}, "temperature", "must be at least 0"),
    ({"max_tokens": 8, "extra_body": {"ets": {"max_tokens": 100}}}, "max_tokens", "not both"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages", "needs a user message"),
    # Refused by the search core once the root is known: the budget is below the prompt.
    ({"extra_body": {"ets": {"max_tokens": 8}}}, "ets.max_tokens", "ets.max_tokens: "),
])
async def test_bad_request_is_400_naming_the_field(svc: OpenAIHarness, kwargs: dict[str, Any], param: str,
                                                   text: str) -> None:
    args: dict[str, Any] = {"model": "rebase", "messages": MESSAGES, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        await svc.client.chat.completions.create(**args)
    error = info.value.body
    assert isinstance(error, dict)
    assert info.value.status_code == 400 and error["param"] == param and error["type"] == "invalid_request_error"
    assert text in error["message"], error
    assert info.value.response.headers["x-should-retry"] == "false"


async def test_malformed_bodies_are_400_naming_the_body(svc: OpenAIHarness) -> None:
    async with httpx.AsyncClient() as http:
        for content in (b"{not json", b"[1, 2]"):
            r = await http.post(f"{svc.base_url}/chat/completions", content=content,
                                headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "body", r.text
        r = await http.post(f"{svc.base_url}/chat/completions", json={"messages": MESSAGES})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"


async def test_missing_or_wrong_token_is_401(tmp_path: Path) -> None:
    """The service's token file (ETS_SEARCH_AUTH_TOKEN_FILE) guards both transports; TLS:
    tests/package/test_security.py."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    async with harness_of(OpenAIHarness, SCRIPT, SCORES, openai_port=free_port(),
                          auth_token_file=str(token_file)) as h:
        reply = await h.client.chat.completions.create(model="rebase", messages=MESSAGES)
        assert ets_of(reply)["answer"] == "3"
        for key in ("wrong", None):
            async with httpx.AsyncClient() as http:
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                r = await http.post(f"{h.base_url}/chat/completions", headers=headers,
                                    json={"model": "rebase", "messages": MESSAGES})
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
                assert (await http.get(f"{h.base_url}/models", headers=headers)).status_code == 401
                # Health stays open for probes.
                assert (await http.get(h.base_url.removesuffix("/v1") + "/health")).status_code in (200, 503)
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(base_url=h.base_url, api_key="wrong", max_retries=0).chat.completions.create(
                model="rebase", messages=MESSAGES)


async def test_queue_full_is_429(tight: OpenAIHarness) -> None:
    tight.upstreams.hold()
    running = asyncio.ensure_future(tight.client.chat.completions.create(model="rebase", messages=MESSAGES))
    await tight.held()
    queued = asyncio.ensure_future(tight.client.chat.completions.create(model="rebase", messages=MESSAGES))
    while tight.server.admission.queued < 1:
        await asyncio.sleep(0.01)
    with pytest.raises(openai.RateLimitError) as info:
        await tight.client.chat.completions.create(model="rebase", messages=MESSAGES, stream=True)
    assert info.value.status_code == 429 and "ETS_MAX_QUEUED_SEARCHES" in str(info.value)
    assert info.value.response.headers["retry-after"] == "1"
    tight.upstreams.release()
    assert [ets_of(r)["answer"] for r in await asyncio.gather(running, queued)] == ["3", "3"]
    await tight.idle()
    assert tight.outcomes()["resource_exhausted"] == 1 and tight.outcomes()["ok"] == 2


async def test_upstream_down_is_503_and_internal_error_500(svc: OpenAIHarness) -> None:
    svc.upstreams.reward_error = UpstreamUnavailable("reward", "scripted-reward", "gone")
    with pytest.raises(openai.InternalServerError) as info:
        await svc.client.chat.completions.create(model="rebase", messages=MESSAGES)
    assert info.value.status_code == 503
    assert "reward server unavailable" in str(info.value)
    assert "x-should-retry" not in info.value.response.headers  # a blip: worth the client's retry
    svc.upstreams.reward_error = None
    svc.upstreams.policy_error = RuntimeError("kaboom")
    with pytest.raises(openai.InternalServerError) as info:
        await svc.client.chat.completions.create(model="rebase", messages=MESSAGES)
    assert info.value.status_code == 500 and info.value.response.headers["x-should-retry"] == "false"
    await svc.idle()
    assert svc.outcomes()["unavailable"] == 1 and svc.outcomes()["error"] == 1


async def test_deadline_is_504(svc: OpenAIHarness) -> None:
    svc.upstreams.hold()
    with pytest.raises(openai.InternalServerError) as info:
        await svc.client.chat.completions.create(model="rebase", messages=MESSAGES,
                                                 extra_headers={"X-ETS-Timeout-S": "0.3"})
    assert info.value.status_code == 504 and "deadline" in str(info.value)
    await svc.idle()
    assert svc.outcomes()["deadline_exceeded"] == 1
    assert svc.upstreams.waiting == 0  # the held expansion was cancelled with its search


async def _stream_held_at_first_expansion(svc: OpenAIHarness) -> Any:
    """A streamed completion whose first chunk (the assistant role) has arrived, its search held at
    its first expansion."""
    svc.upstreams.hold()
    stream = await svc.client.chat.completions.create(model="rebase", messages=MESSAGES, stream=True)
    first = await stream.__anext__()
    assert first.choices[0].delta.role == "assistant"
    await svc.held()
    return stream


async def test_failure_after_the_stream_started_is_an_error_event(svc: OpenAIHarness) -> None:
    stream = await _stream_held_at_first_expansion(svc)
    svc.upstreams.policy_error = UpstreamUnavailable("policy", "scripted-policy", "gone")
    svc.upstreams.release()
    with pytest.raises(openai.APIError, match="policy server unavailable"):
        async for _ in stream:
            pass


# ---- disconnects -----------------------------------------------------------------------------------

async def test_client_leaving_a_stream_stops_the_search(svc: OpenAIHarness) -> None:
    stream = await _stream_held_at_first_expansion(svc)
    await stream.close()
    await svc.idle()
    assert svc.outcomes()["cancelled"] == 1
    assert svc.upstreams.expansions == 1  # no policy call after the client left
    svc.upstreams.release()


async def test_client_leaving_a_plain_request_stops_the_search(svc: OpenAIHarness) -> None:
    svc.upstreams.hold()
    call = asyncio.ensure_future(svc.client.chat.completions.create(model="rebase", messages=MESSAGES))
    await svc.held()
    call.cancel()  # closes the connection
    await asyncio.gather(call, return_exceptions=True)
    await svc.idle()
    assert svc.outcomes()["cancelled"] == 1 and svc.upstreams.expansions == 1
    svc.upstreams.release()


# ---- health and request parsing ---------------------------------------------------------------------

async def test_health_follows_the_upstreams(svc: OpenAIHarness) -> None:
    url = svc.base_url.removesuffix("/v1") + "/health"
    assert await svc.server.wait_ready(5)
    async with httpx.AsyncClient() as http:
        ok = await http.get(url)
        assert ok.status_code == 200 and ok.json() == {"status": "SERVING",
                                                        "upstreams": {"policy": "ok", "reward": "ok"}}
        svc.upstreams.probe_result = {"policy": "connection refused", "reward": None}
        svc.server.readiness.reprobe()
        deadline = time.monotonic() + 3
        while (r := await http.get(url)).status_code != 503:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert r.json()["upstreams"]["policy"] == "connection refused"
        missing = await http.get(svc.base_url + "/nothing")
        assert missing.status_code == 404 and "error" in missing.json()


def test_parse_chat_takes_the_served_name_or_the_path_and_names_the_search_by_the_served_name() -> None:
    names = ("smollm2", "/models/smollm2")
    for given in names:
        assert parse_chat({"model": given, "messages": MESSAGES}, {}, names).model == "smollm2"
    with pytest.raises(RequestError) as err:
        parse_chat({"model": "/models/other", "messages": MESSAGES}, {}, names)
    assert err.value.field == "model" and "'smollm2'" in str(err.value) and "/models/smollm2" not in str(err.value)


def test_parse_chat_maps_fields_and_keeps_their_sources() -> None:
    chat = parse_chat({"model": "beam", "messages": [
        {"role": "system", "content": "Sys."}, {"role": "user", "content": "old"},
        {"role": "assistant", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "new"}]}],
        "temperature": 0.6, "max_tokens": 50, "ets": {"width": 8, "timeout_s": 3}},
        {"X-ETS-Lambda-S": "none", "X-ETS-Max-Tokens": "900", "x-other": "1"}, ("policy",))
    assert chat.problem == "new" and chat.system_prompt == "Sys."
    assert chat.overrides == {"method": "beam", "temperature": 0.6, "width": 8, "lambda_s": None}
    assert chat.max_new_tokens == 50 and chat.timeout_s == 3.0
    assert chat.param("config.width") == "ets.width" and chat.param("lambda_s") == "X-ETS-Lambda-S"
    assert chat.param("max_tokens") == "max_tokens" and chat.param("method") == "model"
    with pytest.raises(RequestError, match=r"^messages\[0\].content\[0\]: only text parts"):
        parse_chat({"model": "beam", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, {}, ("p",))
    with pytest.raises(RequestError, match="^top_p: "):
        parse_chat({"model": "beam", "messages": MESSAGES, "top_p": 0.9}, {}, ("p",))
