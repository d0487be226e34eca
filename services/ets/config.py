"""The search configuration at the edges: server defaults from the environment and the name checks.

The value type itself is pure and lives with the algorithm (``ets.search.config.SearchConfig``).
What only an edge may know is here:

- the search defaults' environment variables, ``ETS_SEARCH_<FIELD>`` (``env_name``: the one place a
  config field becomes a variable name; ``search_defaults_from_env`` reads them through
  ``ets.settings``, the one loader, and names the variable in a ``SettingError``);
- ``validate``: everything a search's config must pass before it reaches the loop: the field
  rules (``SearchConfig.validate``), the method registry (``ets.search.selection``), and the names
  the core carries without knowing them: ``policy_model_type`` against the policy's registry
  (``ets.policy.model_types``) and ``prm_type`` against the reward server's
  (``ets.reward.prm_types``). The service's request checks, its defaults and the evaluation use it.
"""
from __future__ import annotations

from typing import Callable, Mapping

from ets import settings
from ets.errors import ConfigError, FieldError, SettingError
from ets.policy.model_types import POLICY_MODEL_TYPES
from ets.reward.prm_types import PRM_TYPES
from ets.search import selection
from ets.search.config import SearchConfig, ValidConfig

__all__ = ["SEARCH_ENV_PREFIX", "env_name", "search_defaults_from_env", "validate"]

# The search defaults' environment variables: ETS_SEARCH_<FIELD> (ETS_SEARCH_WIDTH). The search
# service's own settings share the prefix (ETS_SEARCH_PORT): one prefix for everything ``ets serve``
# reads; ``ets.service.settings`` refuses, at import, a setting whose name a config field also has.
SEARCH_ENV_PREFIX = "ETS_SEARCH_"


def env_name(field: str, prefix: str = SEARCH_ENV_PREFIX) -> str:
    """The variable of a config field: ``width`` (or a request's ``config.width``) -> ``ETS_SEARCH_WIDTH``."""
    return prefix + field.removeprefix("config.").upper()


def validate(config: SearchConfig) -> ValidConfig:
    """``config`` checked as a search needs it (ConfigError naming the first bad field): its field
    rules and method (``ets.search.selection.validate``), its policy model type and its PRM type."""
    valid = selection.validate(config)
    if valid.policy_model_type not in POLICY_MODEL_TYPES:
        raise ConfigError("policy_model_type",
                          f"unknown {valid.policy_model_type!r}; expected one of {list(POLICY_MODEL_TYPES)}")
    if valid.prm_type not in PRM_TYPES:
        raise ConfigError("prm_type", f"unknown {valid.prm_type!r}; expected one of {list(PRM_TYPES)}")
    return valid


def search_defaults_from_env(
    prefix: str = SEARCH_ENV_PREFIX, environ: Mapping[str, str] | None = None, base: SearchConfig | None = None,
    check: Callable[[SearchConfig], ValidConfig] = validate,
) -> ValidConfig:
    """Server-wide search defaults from ``{prefix}{FIELD}`` variables (e.g. ETS_SEARCH_WIDTH=64) over
    ``base`` (default: the paper's), checked by ``check`` (default ``validate``; the service adds its
    caps). Empty values are ignored; an unparsable or invalid value raises ``SettingError`` naming
    the variable (``ETS_SEARCH_WIDTH``), whichever check found it."""
    overrides = settings.env_values(SearchConfig, environ, prefix=prefix, error=SettingError, every_field=True)
    config = (base or SearchConfig()).replace(**overrides)
    try:
        return check(config)
    except FieldError as err:
        raise SettingError(env_name(err.field, prefix), err.message) from None
