"""Settings for the bot and the inference service, read once and passed down explicitly."""

from config.settings import Settings, SettingsError

__all__ = ["Settings", "SettingsError"]
