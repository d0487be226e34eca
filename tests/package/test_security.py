"""TLS, mTLS and bearer-token auth of both gRPC servers, over real handshakes on loopback.

The test makes its own PKI with ``cryptography`` (a CA, a server certificate for localhost and
127.0.0.1, a client certificate, and a client certificate from an unrelated CA). The search
service runs in-process over the scripted upstreams; the reward server runs the model-free
rules backend (only its embedder loads a model). The policy client's API key is checked against
a real SGLang CPU engine started with ``--api-key``.
"""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ets.api.v1 import search_pb2, search_pb2_grpc
from ets.errors import FieldError
from ets.policy.client import PolicyClient, PolicyRequestError
from ets.retry import RetryPolicy
from ets.reward.client import RewardClient, RewardError
from ets.reward.rules import SCORE_RIGHT
from ets.security import ClientSecurity, ServerSecurity, bearer_ok, channel
from ets.service.metrics import SearchMetrics
from ets.service.server import SearchServer, ServiceSettings
from ets.service.settings import settings_from_args
from ets.testing.inprocess import PROBLEM, SCORES, SCRIPT, serving
from ets.testing.upstreams import ScriptedPolicy, ScriptedUpstreams, TableScorer

from reward_fixtures import ThreadedRewardServer, reward_config
from tools import free_port

TOKEN = "s3cret-token"


# ---- a PKI made by the test ----------------------------------------------------------------------

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
          *, ca: bool = False, sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


class Pki:
    def __init__(self, root: Path) -> None:
        self.root = root
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _cert("ets test CA", ca_key, None, ca=True)
        self.ca = self._write("ca.pem", ca)
        server_key = ec.generate_private_key(ec.SECP256R1())
        self.server_cert = self._write("server.pem", _cert(
            "localhost", server_key, (ca.subject, ca_key),
            sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
        self.server_key = self._write_key("server.key", server_key)
        client_key = ec.generate_private_key(ec.SECP256R1())
        self.client_cert = self._write("client.pem", _cert("ets client", client_key, (ca.subject, ca_key)))
        self.client_key = self._write_key("client.key", client_key)
        rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
        rogue_ca = _cert("rogue CA", rogue_ca_key, None, ca=True)
        rogue_key = ec.generate_private_key(ec.SECP256R1())
        self.rogue_cert = self._write("rogue.pem", _cert("rogue client", rogue_key, (rogue_ca.subject, rogue_ca_key)))
        self.rogue_key = self._write_key("rogue.key", rogue_key)
        self.token = self._text("token", TOKEN + "\n")  # a mounted Secret often ends in a newline
        self.wrong_token = self._text("wrong-token", "not-the-token")

    def _write(self, name: str, cert: x509.Certificate) -> str:
        path = self.root / name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(path)

    def _write_key(self, name: str, key: ec.EllipticCurvePrivateKey) -> str:
        path = self.root / name
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return str(path)

    def _text(self, name: str, text: str) -> str:
        path = self.root / name
        path.write_text(text)
        return str(path)

    def client(self, *, cert: bool = True, token: str | None = "token") -> ClientSecurity:
        return ClientSecurity(ca_file=self.ca, cert_file=self.client_cert if cert else "",
                              key_file=self.client_key if cert else "",
                              token_file={"token": self.token, "wrong": self.wrong_token, None: ""}[token])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture()
async def secure_search(pki: Pki) -> AsyncIterator[SearchServer]:
    """The search service with TLS, required client certificates (mTLS) and a bearer token."""
    async with serving(ScriptedUpstreams(ScriptedPolicy(SCRIPT), TableScorer(SCORES)), openai_port=free_port(),
                       tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca,
                       auth_token_file=pki.token) as server:
        yield server


def _scripted(server: SearchServer) -> ScriptedUpstreams:
    assert isinstance(server.upstreams, ScriptedUpstreams)
    return server.upstreams


def _addr(server: SearchServer) -> str:
    return f"localhost:{server.port}"


REQUEST = search_pb2.SearchRequest(problem=PROBLEM, request_id="tls-1")


async def _search(addr: str, security: ClientSecurity, *, stream: bool = False) -> search_pb2.SearchResponse:
    async with channel(addr, security) as ch:
        stub = search_pb2_grpc.SearchServiceStub(ch)
        if stream:
            events = [e async for e in stub.SearchStream(REQUEST, timeout=10)]
            return events[-1].result
        return await stub.Search(REQUEST, timeout=10)


# ---- search service ------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
async def test_search_over_mtls_with_the_token(secure_search: SearchServer, pki: Pki, stream: bool) -> None:
    response = await _search(_addr(secure_search), pki.client(), stream=stream)
    assert response.answer == "3" and response.request_id == "tls-1"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("token", ["wrong", None])
async def test_wrong_or_missing_token_is_unauthenticated(secure_search: SearchServer, pki: Pki, token: str | None,
                                                         stream: bool) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _search(_addr(secure_search), pki.client(token=token), stream=stream)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in (info.value.details() or "")
    assert _scripted(secure_search).expansions == 0  # refused before any search ran


async def test_health_stays_open_without_a_token(secure_search: SearchServer, pki: Pki) -> None:
    async with channel(_addr(secure_search), pki.client(token=None)) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)


@pytest.mark.parametrize("client", ["no certificate", "certificate of another CA", "plaintext"])
async def test_mtls_refuses_clients_without_a_certificate_it_trusts(secure_search: SearchServer, pki: Pki,
                                                                   client: str) -> None:
    security = {
        "no certificate": pki.client(cert=False),
        "certificate of another CA": ClientSecurity(ca_file=pki.ca, cert_file=pki.rogue_cert, key_file=pki.rogue_key,
                                                    token_file=pki.token),
        "plaintext": ClientSecurity(token_file=pki.token),
    }[client]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _search(_addr(secure_search), security)
    # The handshake fails: the call never reaches the service.
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert _scripted(secure_search).expansions == 0


async def test_client_refuses_a_server_its_ca_did_not_sign(secure_search: SearchServer, pki: Pki) -> None:
    security = ClientSecurity(ca_file=pki.rogue_cert, cert_file=pki.client_cert, key_file=pki.client_key,
                              token_file=pki.token)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _search(_addr(secure_search), security)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_bearer_check() -> None:
    assert bearer_ok("Bearer abc", "abc") and bearer_ok("bearer abc", "abc")
    for header in (None, "", "abc", "Bearer abd", "Bearer ab", "Basic abc", "Bearer abcd"):
        assert not bearer_ok(header, "abc"), header


def test_half_configured_tls_names_the_setting(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(FieldError, match="^ETS_SEARCH_TLS_KEY_FILE: "):
        ServerSecurity(cert_file=pki.server_cert).check()
    with pytest.raises(FieldError, match="^ETS_REWARD_TLS_CLIENT_CA_FILE: .*ETS_REWARD_TLS_CERT_FILE"):
        ServerSecurity(client_ca_file=pki.ca, env_prefix="ETS_REWARD_").check()
    with pytest.raises(FieldError, match="^ETS_SEARCH_AUTH_TOKEN_FILE: .*cannot read"):
        ServerSecurity(token_file=str(tmp_path / "missing")).check()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(FieldError, match="^ETS_SEARCH_AUTH_TOKEN_FILE: .*empty"):
        ServerSecurity(token_file=str(empty)).check()


def test_serve_refuses_a_token_file_it_cannot_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        settings_from_args([], env={"ETS_SEARCH_AUTH_TOKEN_FILE": str(tmp_path / "nope")})
    assert exit_info.value.code == 2
    assert "ETS_SEARCH_AUTH_TOKEN_FILE" in capsys.readouterr().err


# ---- reward server -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def secure_reward(reward_servers: Callable[..., ThreadedRewardServer], pki: Pki) -> ThreadedRewardServer:
    return reward_servers(reward_config("", "arithmetic", "rules", tls_cert_file=pki.server_cert,  # type: ignore[arg-type]
                                        tls_key_file=pki.server_key, tls_client_ca_file=pki.ca,
                                        auth_token_file=pki.token))


async def test_reward_server_over_mtls_with_the_token(secure_reward: ThreadedRewardServer, pki: Pki) -> None:
    addr = f"localhost:{secure_reward.server.port}"
    async with RewardClient(addr, security=pki.client()) as client:
        assert (await client.info()).prm_type == "arithmetic"
        assert await client.score([("What is 1 + 2?", ["1 + 2 = 3"])]) == [[pytest.approx(SCORE_RIGHT)]]
    async with RewardClient(addr, security=pki.client(token="wrong"), retry=RetryPolicy(max_retries=2)) as client:
        with pytest.raises(RewardError) as info:
            await client.info()
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED  # not retried as if the server were down
    async with channel(addr, pki.client(token=None)) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    async with RewardClient(addr, security=pki.client(cert=False), retry=RetryPolicy(max_retries=0)) as client:
        with pytest.raises(RewardError) as refused:
            await client.info()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE


async def test_search_service_reaches_a_secured_reward_server(secure_reward: ThreadedRewardServer, pki: Pki) -> None:
    """The search service's reward client takes ETS_REWARD_TLS_* and ETS_REWARD_AUTH_TOKEN_FILE."""
    from ets.service.upstreams import LiveUpstreams

    settings = ServiceSettings(reward_addr=f"localhost:{secure_reward.server.port}", reward_tls_ca_file=pki.ca,
                               reward_tls_client_cert_file=pki.client_cert, reward_tls_client_key_file=pki.client_key,
                               reward_auth_token_file=pki.token)
    up = LiveUpstreams("http://127.0.0.1:1", settings.reward_addr, metrics=SearchMetrics(process_metrics=False),
                       reward_security=settings.reward_security())
    try:
        assert (await up.probe())["reward"] is None
        assert await up.reward_client().score_last_steps([]) == []
        info = await up.reward_client().info()
        assert info.prm_backend == "rules"
    finally:
        await up.close()


# ---- policy API key ------------------------------------------------------------------------------

async def test_policy_client_sends_the_api_key(sglang_servers: Any, tiny_policy_model: Path) -> None:
    """A real engine started with ``--api-key``: the client's bearer token opens its API, and
    without it the engine answers 401 (its /health stays open, so probes need no key)."""
    url = sglang_servers.get(tiny_policy_model, extra_args=("--api-key", "policy-key")).url
    async with PolicyClient(url, api_key="policy-key") as client:
        assert await client.tokenize("What is 1 + 2?")
        assert (await client.model_info())["model_path"] == str(tiny_policy_model)
    async with PolicyClient(url) as client:
        assert await client.health(timeout=30)
        with pytest.raises(PolicyRequestError) as err:
            await client.tokenize("What is 1 + 2?")
        assert err.value.status == 401


async def test_cli_search_with_tls_flags(secure_search: SearchServer, pki: Pki) -> None:
    """``ets search`` takes the CA, client certificate and token (flags or ETS_SEARCH_* env)."""
    import asyncio
    import json
    import os
    import sys

    argv = [sys.executable, "-m", "ets.cli", "search", "What is 1 + 2?", "--addr", _addr(secure_search), "--json",
            "--summary-only", "--tls-ca", pki.ca, "--tls-cert", pki.client_cert, "--tls-key", pki.client_key]
    env = dict(os.environ, ETS_SEARCH_AUTH_TOKEN_FILE=pki.token)
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["answer"] == "3" and result["candidates_omitted"] and result["candidates"] == []
    env["ETS_SEARCH_AUTH_TOKEN_FILE"] = pki.wrong_token
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1 and "UNAUTHENTICATED" in err.decode()


async def test_openai_http_port_gets_the_same_tls_and_token(secure_search: SearchServer, pki: Pki) -> None:
    """The OpenAI-compatible transport of the same service: the gRPC port's TLS context (mTLS) and
    bearer token (``ets.security``); /health stays open for probes."""
    import ssl

    import aiohttp

    assert secure_search.openai is not None
    base = f"https://localhost:{secure_search.openai.port}"
    client_ctx = ssl.create_default_context(cafile=pki.ca)
    client_ctx.load_cert_chain(pki.client_cert, pki.client_key)
    body = {"model": "rebase", "messages": [{"role": "user", "content": "What is 1 + 2?"}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/chat/completions", json=body, ssl=client_ctx,
                                headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200 and (await resp.json())["ets"]["answer"] == "3"
        for headers in ({"Authorization": "Bearer nope"}, {}):
            async with session.post(f"{base}/v1/chat/completions", json=body, ssl=client_ctx,
                                    headers=headers) as resp:
                assert resp.status == 401 and (await resp.json())["error"]["type"] == "authentication_error"
        async with session.get(f"{base}/health", ssl=client_ctx) as resp:
            assert resp.status in (200, 503)  # open: no token needed
        with pytest.raises(aiohttp.ClientError):  # no client certificate: the handshake fails
            async with session.get(f"{base}/health", ssl=ssl.create_default_context(cafile=pki.ca)) as resp:
                await resp.text()
        with pytest.raises(aiohttp.ClientError):  # plaintext HTTP to the TLS port
            async with session.get(f"http://127.0.0.1:{secure_search.openai.port}/health") as resp:
                await resp.text()
