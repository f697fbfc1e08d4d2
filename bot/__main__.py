"""`python -m bot`: read the settings, check the token, run the bot until stopped.

Problems a person can fix (no token, a malformed or rejected token, no network) end in a short
explanation on stderr and a non-zero exit status, not a traceback.  With the message-content
intent switched off in the developer portal, the bot says how to turn it on and runs without it
(slash commands and the Apps menus need no privileged intent).  The token itself is never
printed or logged.
"""

from __future__ import annotations

import logging
import re
import sys

import aiohttp
import discord

from bot.client import create_bot
from config import Settings
from config.settings import SettingsError

#: A bot token is three base64url parts joined by dots.
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{20,}")

HOW_TO_SET_TOKEN = """\
Set DISCORD_TOKEN to your bot's token, in the environment or in a .env file next to where you
run the bot (copy .env.example to .env):

    DISCORD_TOKEN=your-token-here

Get the token from https://discord.com/developers/applications → your application → Bot →
Reset Token.  See the README, "Running the Discord bot"."""

NO_MESSAGE_CONTENT_INTENT = """\
The Message Content intent is off for this bot, so it cannot read prefix commands or image
links in messages.  Running without it: slash commands, the Apps menus and commands that
@mention the bot still work.  To turn it on: https://discord.com/developers/applications →
your application → Bot → Privileged Gateway Intents → Message Content Intent."""

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def token_problem(token: str | None) -> str | None:
    """What is wrong with the configured token, as a sentence; None if it looks usable."""
    if token is None or not token.strip():
        return "DISCORD_TOKEN is not set."
    token = token.strip()
    if token.lower().startswith("bot "):
        return 'DISCORD_TOKEN starts with "Bot ": set only the token itself, without that prefix.'
    if not _TOKEN_SHAPE.fullmatch(token):
        return "DISCORD_TOKEN does not look like a bot token (three parts separated by dots)."
    return None


def main() -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"Configuration error: {error}", file=sys.stderr)
        return EXIT_CONFIG

    problem = token_problem(settings.discord_token)
    if problem is not None:
        print(f"{problem}\n\n{HOW_TO_SET_TOKEN}", file=sys.stderr)
        return EXIT_CONFIG
    assert settings.discord_token is not None

    discord.utils.setup_logging(level=logging.INFO)
    token = settings.discord_token.strip()
    try:
        try:
            create_bot(settings).run(token, log_handler=None)
        except discord.PrivilegedIntentsRequired:
            # Slash commands and the Apps menus need no privileged intent: run with those.
            print(NO_MESSAGE_CONTENT_INTENT, file=sys.stderr)
            create_bot(settings, message_content=False).run(token, log_handler=None)
    except discord.LoginFailure:
        print(f"Discord rejected the token in DISCORD_TOKEN.\n\n{HOW_TO_SET_TOKEN}", file=sys.stderr)
        return EXIT_RUNTIME
    except (aiohttp.ClientConnectionError, OSError) as error:
        print(f"Could not reach Discord ({error.__class__.__name__}); check the network.", file=sys.stderr)
        return EXIT_RUNTIME
    return 0


if __name__ == "__main__":
    sys.exit(main())
