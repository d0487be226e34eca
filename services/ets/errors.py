"""The error shapes every edge validates with: a message that starts with the field it is about.

Three classes, by what the field names (transports map them to gRPC INVALID_ARGUMENT / HTTP 400,
the commands to exit status 2):

- ``FieldError``: the base (a request field, ``problem`` or ``config.width``; the reward server's
  request checks, the model catalogue's entries subclass it);
- ``ConfigError``: a bad value of a ``SearchConfig`` field, named by its config name (``width``):
  the search core raises it, and whoever holds the request renames it once (``config.width`` for a
  request, ``ETS_SEARCH_WIDTH`` for a server default);
- ``SettingError``: a bad server setting, named by its environment variable (and flag), e.g.
  ``ETS_REWARD_PORT`` or ``--port (ETS_SEARCH_PORT)``: the one class for every setting the
  loader ``ets.settings`` reads (search service, reward server, search defaults).
"""
from __future__ import annotations


class FieldError(ValueError):
    """An invalid value; ``field`` names the offending setting, env var or request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ConfigError(FieldError):
    """An invalid configuration value; ``field`` names the offending ``SearchConfig`` field."""


class SettingError(FieldError):
    """An invalid server setting; ``field`` names the environment variable (and flag, if given)."""
