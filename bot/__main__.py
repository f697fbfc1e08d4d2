"""`python -m bot`: read the settings, check the token, run the bot until stopped.

Problems a person can fix (no token, a malformed or rejected token, no network) end in a short
explanation on stderr and a non-zero exit status, not a traceback.  With the message-content
intent switched off in the developer portal, the bot says how to turn it on and runs without it
(slash commands and the Apps menus need no privileged intent).  The token itself is never
printed or logged.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import string
import sys

import aiohttp
import discord

from bot.client import create_bot
from config import Settings
from config.settings import SettingsError
from inference.service.factory import create_service

#: A bot token is three base64url parts joined by dots: (ordinal, what the part encodes, the
#: fewest characters it has in a real token).
_TOKEN_PARTS = (("first", "the bot's user id", 20), ("second", "a timestamp", 4), ("third", "a signature", 20))
_BASE64URL = frozenset(string.ascii_letters + string.digits + "-_")

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
    parts = token.split(".")
    if len(parts) != 3:
        counted = f"{len(parts)} dot-separated part" + ("" if len(parts) == 1 else "s")
        return f"DISCORD_TOKEN does not look like a bot token: it has {counted}, not three."
    for part, (ordinal, meaning, shortest) in zip(parts, _TOKEN_PARTS):
        # Naming the offending characters is safe: no token contains them.
        strangers = sorted(set(part) - _BASE64URL)
        if strangers:
            return (
                f"The {ordinal} part of DISCORD_TOKEN ({meaning}) has characters no token contains: "
                f"{', '.join(map(repr, strangers))}.  Copy the token again, without quotes or spaces."
            )
        if len(part) < shortest:
            return (
                f"The {ordinal} part of DISCORD_TOKEN ({meaning}) is {len(part)} characters long; in a bot "
                f"token it has at least {shortest}.  Was the token cut short when it was copied?"
            )
    return None


def silence_voice_warnings() -> None:
    """The bot never joins a voice channel, so discord.py's start-up warnings that the voice
    libraries (PyNaCl, davey) are missing are noise.  discord.py warns once per process, when the
    first client is built, if these `VoiceClient` flags are still set; clearing them silences
    exactly those two warnings and nothing else that is logged."""
    discord.VoiceClient.warn_nacl = False
    discord.VoiceClient.warn_dave = False


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
    silence_voice_warnings()
    token = settings.discord_token.strip()
    try:
        asyncio.run(run(settings, token))
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass  # Ctrl-C or SIGTERM: `run` has already stopped everything in order
    except discord.LoginFailure:
        print(f"Discord rejected the token in DISCORD_TOKEN.\n\n{HOW_TO_SET_TOKEN}", file=sys.stderr)
        return EXIT_RUNTIME
    except (aiohttp.ClientConnectionError, OSError) as error:
        print(f"Could not reach Discord ({error.__class__.__name__}); check the network.", file=sys.stderr)
        return EXIT_RUNTIME
    return 0


async def run(settings: Settings, token: str) -> None:
    """discord.py's advanced start-up: the service and the bot under `async with`, the one
    handed to the other.  Leaving the blocks stops them in the order of the hardening issue:
    the bot drains its answers and closes its HTTP session, then the service closes."""
    _stop_on_sigterm()
    async with create_service(settings) as service:  # INFERENCE_BACKEND: local or ray
        try:
            async with create_bot(settings, service=service) as bot:
                await bot.start(token)
        except discord.PrivilegedIntentsRequired:
            # Slash commands and the Apps menus need no privileged intent: run with those,
            # on the same service.
            print(NO_MESSAGE_CONTENT_INTENT, file=sys.stderr)
            async with create_bot(settings, service=service, message_content=False) as bot:
                await bot.start(token)


def _stop_on_sigterm() -> None:
    """A platform stopping the bot (a deploy: SIGTERM) gets the same orderly stop as Ctrl-C:
    the running task is cancelled and the `async with` blocks close everything."""
    task = asyncio.current_task()
    if task is None:
        return
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    except (NotImplementedError, RuntimeError):
        pass  # Windows, or not the main thread: the default handling stays


if __name__ == "__main__":
    sys.exit(main())
