"""Settings of the search service (``ets serve``): each env var with its flag, default and check.

Owns ``ServiceSettings`` (one ``ets.settings.setting`` field per setting: the env var, the
generated ``--flag``, the default and the bounds live together) and ``settings_from_args``
(environment, then flags; a bad value exits with status 2 naming the flag and its env var).
Search defaults (``ETS_SEARCH_<FIELD>``) are ``SearchConfig.from_env``'s; the admission limits'
names and defaults are ``ets.service.admission``'s.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Mapping

from ets import settings
from ets.errors import FieldError
from ets.service.admission import (
    DEFAULT_MAX_CONCURRENT,
    DEFAULT_MAX_QUEUED,
    MAX_CONCURRENT_ENV,
    MAX_QUEUED_ENV,
)
from ets.service.metrics import DEFAULT_PORT as DEFAULT_METRICS_PORT
from ets.service.metrics import METRICS_PORT_ENV

DEFAULT_PORT = 50051
DEFAULT_OPENAI_PORT = 8000
DEFAULT_GRACE_S = 30.0


class SettingsError(FieldError):
    """An invalid search-service setting; ``field`` names the env var (and flag)."""


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
    reward_addr: str = settings.setting("reward:50052", env="ETS_REWARD_ADDR", help="reward server HOST:PORT")
    grace_s: float = settings.setting(DEFAULT_GRACE_S, env="ETS_SEARCH_GRACE_S", flag="--grace", ge=0,
                                      help="seconds in-flight searches may finish after SIGTERM")
    max_concurrent: int = settings.setting(DEFAULT_MAX_CONCURRENT, env=MAX_CONCURRENT_ENV, ge=1,
                                           help="searches running at once")
    max_queued: int = settings.setting(DEFAULT_MAX_QUEUED, env=MAX_QUEUED_ENV, ge=0,
                                       help="searches waiting for a slot; beyond: RESOURCE_EXHAUSTED")
    log_level: str = settings.setting("INFO", env="ETS_LOG_LEVEL", help="Python logging level")


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
        return settings.from_args(ServiceSettings, args, env=os.environ if env is None else env,
                                  error=SettingsError)
    except SettingsError as err:
        p.error(str(err))
