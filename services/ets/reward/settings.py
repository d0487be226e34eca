"""The reward server's settings and its PRM backend factory.

Owns ``RewardServerConfig`` (env ``ETS_PRM_*``, ``ETS_EMBEDDER_MODEL``, ``ETS_DEVICE``,
``ETS_REWARD_*``, and the flags generated from them by ``ets.settings``; the PRM token strings
``PrmOptions`` and the spawned PRM engine's ``ETS_PRM_SGLANG_*`` are read with them, at startup),
its validation (``SettingError`` naming the variable), and ``build_backend``: the configured PRM
backend (rules, transformers, or SGLang under the engine supervisor), not started, built from the
config alone (it reads no environment).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from ets import settings
from ets.reward.prm_types import MODEL_FREE_PRM_TYPES, PRM_TYPES
from ets.engine.launcher import DEVICES, LaunchConfig
from ets.errors import FieldError, SettingError
from ets.reward.adapters import PrmOptions
from ets.engine.supervisor import EngineSupervisor
from ets.reward.backends import BACKENDS, PrmBackend
from ets.reward.backends.rules_backend import RulesBackend
from ets.reward.backends.sglang_backend import SglangBackend
from ets.reward.backends.transformers_backend import TransformersBackend
from ets.reward.metrics import RewardMetrics
from ets.security import ServerSecurity
from ets.settings import setting

GPU_PRM_MEM_FRACTION = 0.85


# The spawned PRM engine's SGLang settings: LaunchConfig's names with this prefix in place of ETS_POLICY_.
PRM_ENGINE_ENV_PREFIX = "ETS_PRM_SGLANG_"


@dataclass(frozen=True)
class RewardServerConfig:
    """The reward server's settings: each field's env var, ``--flag``, default and bounds are
    declared once here (``ets.settings``); ``validate`` adds the rules that span fields."""

    prm_model: str = setting("", env="ETS_PRM_MODEL", help="PRM model folder (none for the rules backend)")
    prm_type: str = setting("math-shepherd", env="ETS_PRM_TYPE", choices=PRM_TYPES)
    prm_backend: str = setting("sglang", env="ETS_PRM_BACKEND", choices=BACKENDS)
    # Attach to this SGLang PRM server instead of spawning one (sglang backend only).
    prm_url: str = setting("", env="ETS_PRM_URL", help="attach to this SGLang PRM server instead of spawning one")
    prm_port: int = setting(30001, env="ETS_PRM_PORT", ge=0, le=65535, help="port of the spawned SGLang PRM server")
    # Bind address of the spawned PRM server: loopback by default (only the reward server talks to
    # it); 0.0.0.0 in containers so Prometheus can scrape its /metrics.
    prm_host: str = setting("127.0.0.1", env="ETS_PRM_HOST", help="bind address of the spawned SGLang PRM server")
    prm_mem_fraction: float | None = setting(None, env="ETS_PRM_MEM_FRACTION", gt=0, lt=1,
                                             help="spawned PRM's --mem-fraction-static (0.85 on GPU)")
    prm_start_timeout_s: float = setting(600.0, env="ETS_PRM_START_TIMEOUT_S", ge=0,
                                         help="seconds the spawned PRM server may take to become healthy")
    prm_dtype: str = setting("auto", env="ETS_PRM_DTYPE", help="transformers backend dtype: auto|bfloat16|float32")
    embedder_model: str = setting("", env="ETS_EMBEDDER_MODEL", help="sentence-transformers model")
    device: str = setting("cuda", env="ETS_DEVICE", choices=DEVICES, lower=True)
    host: str = setting("0.0.0.0", env="ETS_REWARD_HOST", help="bind address")
    port: int = setting(50052, env="ETS_REWARD_PORT", ge=0, le=65535, help="gRPC port (0 = any free port)")
    metrics_port: int = setting(9092, env="ETS_REWARD_METRICS_PORT", ge=0, le=65535, help="Prometheus port")
    # Trajectories per Score call and texts per Embed call.
    max_batch_size: int = setting(256, env="ETS_REWARD_MAX_BATCH_SIZE", ge=1, help="trajectories/texts per call")
    grace_s: float = setting(10.0, env="ETS_REWARD_GRACE_S", ge=0, help="SIGTERM grace period for in-flight calls")
    drain_delay_s: float = setting(
        3.0, env="ETS_REWARD_DRAIN_DELAY_S", ge=0,
        help="after SIGTERM, seconds the server reports NOT_SERVING but still serves, so that clients "
        "balancing with health checks (and Kubernetes endpoints) take it out of rotation before it stops "
        "accepting calls; then in-flight calls get ETS_REWARD_GRACE_S")
    # Default: the reward server's stdout, i.e. the container log (rotated by the runtime); a file
    # there was appended to forever on the containers' 1 GiB /tmp tmpfs.
    log_dir: str = setting("", env="ETS_REWARD_LOG_DIR",
                           help="folder for the spawned PRM server's log file; empty = this server's stdout")
    log_level: str = setting("INFO", env="ETS_LOG_LEVEL", help="Python logging level")
    # Capacity: Score/Embed calls at once, and trajectories/texts of the calls waiting for a turn;
    # beyond the queue a call gets RESOURCE_EXHAUSTED at once (memory bounded by configuration).
    max_concurrent: int = setting(32, env="ETS_REWARD_MAX_CONCURRENT", ge=1,
                                  help="Score/Embed calls served at once")
    max_queued_items: int = setting(4096, env="ETS_REWARD_MAX_QUEUED_ITEMS", ge=0,
                                    help="trajectories/texts of calls waiting for a turn; beyond: RESOURCE_EXHAUSTED")
    reflection: bool = setting(True, env="ETS_REWARD_REFLECTION", help="gRPC server reflection")
    max_connection_age_s: float = setting(300.0, env="ETS_REWARD_MAX_CONNECTION_AGE_S", ge=0,
                                          help="close client connections after this long (0 = never)")
    tls_cert_file: str = setting("", env="ETS_REWARD_TLS_CERT_FILE", help="server TLS certificate (PEM); "
                                 "unset = plaintext")
    tls_key_file: str = setting("", env="ETS_REWARD_TLS_KEY_FILE", help="server TLS private key (PEM)")
    tls_client_ca_file: str = setting("", env="ETS_REWARD_TLS_CLIENT_CA_FILE",
                                      help="CA of client certificates; set = mTLS")
    auth_token_file: str = setting("", env="ETS_REWARD_AUTH_TOKEN_FILE",
                                   help="bearer token Score/Embed/Info require (health stays open); unset = no auth")
    # ETS_PRM_STEP_TAG, _PLUS, _MINUS, _SEPARATOR, _YES, _NO, _JUDGE_*_TURN (PrmOptions.from_env).
    options: PrmOptions = field(default_factory=PrmOptions)
    # ETS_PRM_SGLANG_* tunes the spawned PRM server like ETS_POLICY_* tunes the policy's; its model,
    # host, port and device are the fields above (build_backend).
    prm_engine: LaunchConfig = field(default_factory=LaunchConfig)

    def validate(self) -> "RewardServerConfig":
        settings.check(self, error=SettingError, naming="env")
        model_free = self.prm_type in MODEL_FREE_PRM_TYPES
        if model_free and self.prm_backend != "rules":
            raise SettingError("ETS_PRM_BACKEND", f"PRM type {self.prm_type!r} is scored by rules without a model: "
                              f"set ETS_PRM_BACKEND=rules, got {self.prm_backend!r}")
        if self.prm_backend == "rules" and not model_free:
            raise SettingError("ETS_PRM_TYPE", f"the rules backend serves {list(MODEL_FREE_PRM_TYPES)}; "
                              f"{self.prm_type!r} needs a model (ETS_PRM_BACKEND=sglang or transformers)")
        if model_free and self.prm_model:
            # Info would report a model that scores nothing.
            raise SettingError("ETS_PRM_MODEL", f"PRM type {self.prm_type!r} uses no model; leave it empty")
        if not model_free and not self.prm_model:
            raise SettingError("ETS_PRM_MODEL", "required: the PRM model folder (its tokenizer is read locally)")
        if not self.prm_host or any(c.isspace() for c in self.prm_host):
            raise SettingError("ETS_PRM_HOST",
                              f"must be one bind address (127.0.0.1, 0.0.0.0, ...), got {self.prm_host!r}")
        if self.prm_url and self.prm_backend != "sglang":
            raise SettingError("ETS_PRM_URL", "only the sglang backend attaches to a PRM server URL")
        try:
            self.security().check()
        except FieldError as err:  # ets.security names the variable
            raise SettingError(err.field, err.message) from None
        return self

    def security(self) -> ServerSecurity:
        return ServerSecurity(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file, self.auth_token_file,
                              env_prefix="ETS_REWARD_")

    def replace(self, **overrides: Any) -> "RewardServerConfig":
        return replace(self, **overrides)

    @classmethod
    def env_base(cls, env: Mapping[str, str]) -> "RewardServerConfig":
        """The defaults with the settings that have no flag read from ``env``: the PRM token strings
        and the spawned PRM engine's ``ETS_PRM_SGLANG_*`` (``SettingError`` naming the variable)."""
        engine = settings.from_env(LaunchConfig, env, prefix=PRM_ENGINE_ENV_PREFIX, error=SettingError)
        return cls(options=PrmOptions.from_env(env), prm_engine=engine)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "RewardServerConfig":
        env = os.environ if env is None else env
        return settings.from_env(cls, env, base=cls.env_base(env), error=SettingError)


def build_backend(config: RewardServerConfig, metrics: RewardMetrics) -> PrmBackend:
    """The configured PRM backend (not started). Raises AdapterError/LaunchConfigError naming the setting."""
    on_batch = metrics.model_batch.labels("prm").observe
    if config.prm_backend == "rules":
        return RulesBackend(config.prm_type)
    if config.prm_backend == "transformers":
        return TransformersBackend(config.prm_model, config.prm_type, options=config.options, device=config.device,
                                   dtype=config.prm_dtype, max_batch_items=config.max_batch_size, on_batch=on_batch)
    names: dict[str, Any] = dict(name="PRM", port_setting="ETS_PRM_PORT", url_setting="ETS_PRM_URL")
    if config.prm_url:
        supervisor = EngineSupervisor(url=config.prm_url, start_timeout_s=config.prm_start_timeout_s,
                                      on_restart=metrics.prm_restarts.inc, **names)
    else:
        launch = config.prm_engine.replace(
            model_path=config.prm_model, host=config.prm_host, port=config.prm_port, device=config.device,
            served_name="prm",
        )
        if launch.mem_fraction_static is None:
            mem = config.prm_mem_fraction
            if mem is None and config.device == "cuda":
                mem = GPU_PRM_MEM_FRACTION
            launch = launch.replace(mem_fraction_static=mem)
        launch.validate()
        supervisor = EngineSupervisor(launch=launch, log_dir=config.log_dir, start_timeout_s=config.prm_start_timeout_s,
                                      on_restart=metrics.prm_restarts.inc, **names)
    backend = SglangBackend(config.prm_model, config.prm_type, supervisor, options=config.options)
    return backend
