"""The Discord bot: `create_bot(settings)` builds it, `python -m bot` runs it."""

from bot.client import VisionBot, create_bot

__all__ = ["VisionBot", "create_bot"]
