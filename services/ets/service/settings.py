"""Settings of the search service (``ets serve``): each env var with its flag, default and check.

Owns ``ServiceSettings`` (one ``ets.settings.setting`` field per setting: the env var, the
generated ``--flag``, the default and the bounds live together; the operator's caps are read from
here as ``limits()``), ``settings_from_args`` (environment, then flags; a bad value exits with
status 2 naming the flag and its env var) and ``search_defaults``: the server-wide search
defaults ``ETS_SEARCH_<FIELD>`` (``SearchConfig.from_env``), checked as a request would be
(method registry, the caps), every error a ``SettingError`` naming the variable. The admission
limits' names and defaults are ``ets.service.admission``'s.

One prefix, ``ETS_SEARCH_``, for what ``ets serve`` reads: its own settings (``ETS_SEARCH_PORT``)
and the search defaults (``ETS_SEARCH_WIDTH``). Kept rather than split: compose files, manifests
and clients already use both, the two sets are told apart by name (a default is a
``SearchConfig`` field), and an overlap is refused at import below.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Mapping

from ets import settings
from ets.config import SEARCH_ENV_PREFIX, search_defaults_from_env, validate
from ets.search.config import MAX_DEPTH_LIMIT, MAX_TOKENS_LIMIT, MAX_WIDTH, SearchConfig, ValidConfig
from ets.errors import FieldError, SettingError
from ets.security import ClientSecurity, ServerSecurity, read_token
from ets.service.admission import (
    DEFAULT_MAX_CONCURRENT,
    DEFAULT_MAX_QUEUED,
    MAX_CONCURRENT_ENV,
    MAX_QUEUED_ENV,
    MAX_WEIGHT_ENV,
)
from ets.service.metrics import DEFAULT_PORT as DEFAULT_METRICS_PORT
from ets.service.metrics import METRICS_PORT_ENV
from ets.service.request import Limits

DEFAULT_PORT = 50051
DEFAULT_OPENAI_PORT = 8000
DEFAULT_GRACE_S = 30.0


def _http_url(text: str) -> str | None:
    # Checked at startup, not when the first search creates the policy client.
    if not text:
        return None
    if not text.startswith(("http://", "https://")):
        raise ValueError(f"expected http(s)://host:port, got {text!r}")
    return text


def _openai_port(text: str) -> int | None:
    port = settings.parse_as(int, text)
    if not 0 <= port <= 65535:
        raise ValueError(f"must be a port number (or 0 to disable), got {port}")
    return port or None


def _metrics_port(text: str) -> int | None:
    port = settings.parse_as(int, text)
    if port > 65535:
        raise ValueError(f"must be a port number (or -1 to disable), got {port}")
    return None if port < 0 else port


@dataclass
class ServiceSettings:
    host: str = settings.setting("0.0.0.0", env="ETS_SEARCH_HOST", help="bind address")
    port: int = settings.setting(DEFAULT_PORT, env="ETS_SEARCH_PORT", ge=0, le=65535,
                                 help="gRPC port (0 = any free port)")
    # None: no metrics endpoint (in-process tests; -1 from the environment or the flag).
    metrics_port: int | None = settings.setting(DEFAULT_METRICS_PORT, env=METRICS_PORT_ENV, parse=_metrics_port,
                                                help="Prometheus endpoint port; -1 disables it")
    # None: no HTTP front door (0 or empty from the environment or the flag).
    openai_port: int | None = settings.setting(
        DEFAULT_OPENAI_PORT, env="ETS_SEARCH_OPENAI_PORT", parse=_openai_port,
        help="OpenAI-compatible HTTP port (/v1/chat/completions, /v1/models, /health); 0 disables it")
    policy_url: str = settings.setting("http://policy:30000", env="ETS_POLICY_URL", parse=_http_url,
                                       help="the policy SGLang server, or an sglang-router")
    policy_engine_url: str | None = settings.setting(
        None, env="ETS_POLICY_ENGINE_URL", parse=_http_url,
        help="when --policy-url is an sglang-router: one policy engine, for tokenization")
    reward_addr: str = settings.setting(
        "reward:50052", env="ETS_REWARD_ADDR",
        help="the reward server(s): HOST:PORT, or a gRPC target over several replicas, balanced round_robin "
        "with health checking (dns:///reward-headless:50052, ipv4:10.0.0.5:50052,10.0.0.6:50052)")
    grace_s: float = settings.setting(DEFAULT_GRACE_S, env="ETS_SEARCH_GRACE_S", flag="--grace", ge=0,
                                      help="seconds in-flight searches may finish after SIGTERM")
    max_concurrent: int = settings.setting(DEFAULT_MAX_CONCURRENT, env=MAX_CONCURRENT_ENV, ge=1,
                                           help="searches running at once")
    max_queued: int = settings.setting(DEFAULT_MAX_QUEUED, env=MAX_QUEUED_ENV, ge=0,
                                       help="searches waiting for a slot; beyond: RESOURCE_EXHAUSTED")
    max_concurrent_width: int = settings.setting(
        1024, env=MAX_WEIGHT_ENV, ge=1,
        help="sum of the widths of running searches (admission by width: a wide search takes more)")
    log_level: str = settings.setting("INFO", env="ETS_LOG_LEVEL", help="Python logging level")
    # -- operator caps: requests beyond them get INVALID_ARGUMENT naming the field ------------------
    limit_width: int = settings.setting(256, env="ETS_LIMIT_WIDTH", ge=1, le=MAX_WIDTH,
                                        help="largest config.width a request may ask for")
    limit_max_tokens: int = settings.setting(8192, env="ETS_LIMIT_MAX_TOKENS", ge=1, le=MAX_TOKENS_LIMIT,
                                             help="largest config.max_tokens (tokens per trajectory)")
    limit_max_depth: int = settings.setting(100, env="ETS_LIMIT_MAX_DEPTH", ge=1, le=MAX_DEPTH_LIMIT,
                                            help="largest config.max_depth")
    max_solver_time_limit_s: float = settings.setting(
        2.0, env="ETS_MAX_SOLVER_TIME_LIMIT_S", gt=0, le=600,
        help="largest config.solver_time_limit_s (one ETS selection's solver budget)")
    limit_generated_tokens: int = settings.setting(
        1_000_000, env="ETS_LIMIT_GENERATED_TOKENS", ge=1,
        help="tokens one search may generate in all; then it stops and returns what it has")
    limit_search_s: float = settings.setting(
        900.0, env="ETS_LIMIT_SEARCH_S", gt=0, help="longest a search may run (queue included), "
        "whatever the client's deadline; beyond: DEADLINE_EXCEEDED")
    max_send_bytes: int = settings.setting(
        4 * 1024 * 1024, env="ETS_SEARCH_MAX_SEND_BYTES", ge=64 * 1024,
        help="largest response sent; a larger result drops candidates' texts (answer, best and stats kept)")
    selection_workers: int = settings.setting(
        0, env="ETS_SELECTION_WORKERS", ge=0, help="threads running selections off the event loop (0 = cores)")
    upstream_retry_s: float = settings.setting(
        900.0, env="ETS_UPSTREAM_RETRY_S", ge=0,
        help="longest one policy or reward call of a search keeps retrying a lost replica or a restarting "
        "server (never past the search's deadline); 0 = no retries")
    fail_fast: bool = settings.setting(
        False, env="ETS_SEARCH_FAIL_FAST",
        help="refuse new searches at once (UNAVAILABLE naming the upstream) while no replica of an upstream "
        "answered its last health probe, instead of letting them wait for it within their deadline")
    # -- transport ---------------------------------------------------------------------------------
    reflection: bool = settings.setting(True, env="ETS_SEARCH_REFLECTION",
                                        help="gRPC server reflection (off in production manifests)")
    max_connection_age_s: float = settings.setting(
        300.0, env="ETS_SEARCH_MAX_CONNECTION_AGE_S", ge=0,
        help="close client connections after this long (clients reconnect and spread over new pods; 0 = never)")
    tls_cert_file: str = settings.setting("", env="ETS_SEARCH_TLS_CERT_FILE", help="server TLS certificate (PEM); "
                                          "unset = plaintext")
    tls_key_file: str = settings.setting("", env="ETS_SEARCH_TLS_KEY_FILE", help="server TLS private key (PEM)")
    tls_client_ca_file: str = settings.setting(
        "", env="ETS_SEARCH_TLS_CLIENT_CA_FILE",
        help="CA of client certificates; set = mTLS (clients must present one)")
    auth_token_file: str = settings.setting(
        "", env="ETS_SEARCH_AUTH_TOKEN_FILE",
        help="file holding the bearer token Search/SearchStream require (health stays open); unset = no auth")
    reward_tls_ca_file: str = settings.setting(
        "", env="ETS_REWARD_TLS_CA_FILE", help="CA of the reward server's certificate; set = TLS to the reward server")
    reward_tls_client_cert_file: str = settings.setting(
        "", env="ETS_REWARD_TLS_CLIENT_CERT_FILE", help="this service's client certificate for a mTLS reward server")
    reward_tls_client_key_file: str = settings.setting(
        "", env="ETS_REWARD_TLS_CLIENT_KEY_FILE", help="its private key")
    reward_auth_token_file: str = settings.setting(
        "", env="ETS_REWARD_AUTH_TOKEN_FILE", help="bearer token sent to the reward server")
    policy_api_key_file: str = settings.setting(
        "", env="ETS_POLICY_API_KEY_FILE", help="the policy SGLang server's --api-key, sent as a bearer token")

    def limits(self) -> Limits:
        """The operator's caps as the runner applies them, each named by its variable in errors."""
        fields = {"width": "limit_width", "max_tokens": "limit_max_tokens", "max_depth": "limit_max_depth",
                  "solver_time_limit_s": "max_solver_time_limit_s", "generated_tokens": "limit_generated_tokens",
                  "search_s": "limit_search_s", "retry_s": "upstream_retry_s"}
        env = {s.name: s.env_names()[0] for s in settings.settings_of(ServiceSettings)}
        return Limits(**{cap: getattr(self, name) for cap, name in fields.items()},
                      settings={cap: env[name] for cap, name in fields.items()})

    def server_security(self) -> ServerSecurity:
        return ServerSecurity(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file, self.auth_token_file,
                              env_prefix="ETS_SEARCH_")

    def reward_security(self) -> ClientSecurity:
        return ClientSecurity(self.reward_tls_ca_file, self.reward_tls_client_cert_file,
                              self.reward_tls_client_key_file, self.reward_auth_token_file, env_prefix="ETS_REWARD_")

    def policy_api_key(self) -> str | None:
        return read_token(self.policy_api_key_file, "ETS_POLICY_API_KEY_FILE") if self.policy_api_key_file else None

    def check(self) -> None:
        """Cross-field and file checks at startup (``FieldError`` naming the env var)."""
        self.server_security().check()
        self.reward_security().check()
        self.policy_api_key()
        if self.limit_width > self.max_concurrent_width:
            raise SettingError("ETS_LIMIT_WIDTH", f"must not exceed ETS_MAX_CONCURRENT_WIDTH "
                             f"({self.max_concurrent_width}), got {self.limit_width}: such a search could never run")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ets serve", description="Run the gRPC search service. Flags override "
                                "the environment variables named in their help; search defaults come "
                                "from ETS_SEARCH_<FIELD> (e.g. ETS_SEARCH_WIDTH).")
    settings.add_flags(p, ServiceSettings)
    return p


def settings_from_args(argv: list[str], env: Mapping[str, str] | None = None) -> ServiceSettings:
    """The environment (``os.environ`` by default) overridden by ``argv``; exits 2 on a bad value."""
    p = parser()
    args = p.parse_args(argv)
    try:
        result = settings.from_args(ServiceSettings, args, env=os.environ if env is None else env,
                                    error=SettingError)
        result.check()
        return result
    except FieldError as err:
        p.error(str(err))


def search_defaults(service: ServiceSettings, env: Mapping[str, str] | None = None) -> ValidConfig:
    """The search defaults ``ETS_SEARCH_<FIELD>`` over the paper's, checked as a request is (the
    method registry, this server's caps: defaults beyond them would refuse every request that
    relies on them); ``SettingError`` naming the variable."""
    limits = service.limits()
    return search_defaults_from_env(environ=env, check=lambda config: limits.check(validate(config)))


# One prefix, two sets of names: a service setting must not be a search default's name too.
_SHARED = {n for s in settings.settings_of(ServiceSettings) for n in s.env_names()} & {
    s.env_names(SEARCH_ENV_PREFIX)[0] for s in settings.settings_of(SearchConfig, every_field=True)}
if _SHARED:  # pragma: no cover - a naming error, caught by any import
    raise ImportError(f"ServiceSettings and the search defaults both read {sorted(_SHARED)}")
