"""The error every config check raises, and the check itself."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what to do."""


def require(ok: bool, key: str, message: str) -> None:
    """Raise ConfigError ``"<key> <message>"`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} {message}")
