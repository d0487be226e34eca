"""The one error shape every edge validates with: a message that starts with the field it is about.

Transports map these to gRPC INVALID_ARGUMENT / clear CLI errors; each component subclasses it so
callers can still catch its own kind.
"""
from __future__ import annotations


class FieldError(ValueError):
    """An invalid value; ``field`` names the offending setting, env var or request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
