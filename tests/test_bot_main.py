"""`python -m bot` at start-up: what a malformed token is told, and no voice warnings.

Nothing here reaches Discord: a malformed token stops `python -m bot` before any connection,
and the start-up test swaps the bot for a client whose `run` returns at once.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import discord
import pytest

import bot.__main__ as bot_main
from bot.__main__ import token_problem
from tests.conftest import REPO_ROOT

USER_ID = "MTAxMjM0NTY3ODkwMTIzNDU2Nzg5"  # 27 characters
TIMESTAMP = "GAbCdE"
SIGNATURE = "abcdefghijklmnopqrstuvwxyz0123456789AB"
VOICE_WARNING = "voice will NOT be supported"


# --- what a malformed token is told ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "told"),
    [
        (f"{USER_ID}.GA.{SIGNATURE}", ["second part", "a timestamp", "is 2 characters long", "at least 4"]),
        (f"{USER_ID}.{TIMESTAMP}.abcdefghij", ["third part", "a signature", "is 10 characters long", "at least 20"]),
        (f"MTAxMjM0.{TIMESTAMP}.{SIGNATURE}", ["first part", "the bot's user id", "is 8 characters long"]),
        (f'"{USER_ID}.{TIMESTAMP}.{SIGNATURE}"', ["first part", "characters no token contains: '\"'"]),
        (f"{USER_ID}.GAb CdE+/.{SIGNATURE}", ["second part", "characters no token contains: ' ', '+', '/'"]),
        (f"{USER_ID}.{TIMESTAMP}.{SIGNATURE}.extra", ["has 4 dot-separated parts, not three"]),
        (f"{USER_ID}{TIMESTAMP}{SIGNATURE}", ["has 1 dot-separated part, not three"]),
    ],
)
def test_a_malformed_token_is_told_what_is_wrong(token, told):
    problem = token_problem(token)
    assert problem is not None
    for words in told:
        assert words in problem


def test_three_well_formed_parts_pass():
    assert token_problem(f"{USER_ID}.{TIMESTAMP}.{SIGNATURE}") is None


def test_python_m_bot_names_the_part_of_the_token_that_is_wrong(tmp_path):
    token = f"{USER_ID}.GA.{SIGNATURE}"
    environment = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    environment |= {"PYTHONPATH": str(REPO_ROOT), "DISCORD_TOKEN": token}
    done = subprocess.run(  # where there is no .env: only the environment counts
        [sys.executable, "-m", "bot"], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "The second part of DISCORD_TOKEN (a timestamp) is 2 characters long" in done.stderr
    assert "three parts separated by dots" not in done.stderr
    assert token not in done.stderr + done.stdout and SIGNATURE not in done.stderr + done.stdout


# --- no voice warnings at start-up ----------------------------------------------------------------


@pytest.fixture
def voice_libraries_missing(monkeypatch):
    """discord.py's state when neither PyNaCl nor davey is installed, before any client is built
    (it warns once per process, so an earlier test's client would otherwise hide the warnings)."""
    monkeypatch.setattr(discord.VoiceClient, "warn_nacl", True)
    monkeypatch.setattr(discord.VoiceClient, "warn_dave", True)


def _voice_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if VOICE_WARNING in record.getMessage()]


def test_discord_warns_about_voice_when_a_client_is_built(voice_libraries_missing, caplog):
    """The control: without the bot's start-up, building a client logs both warnings."""
    with caplog.at_level(logging.WARNING, logger="discord"):
        discord.Client(intents=discord.Intents.none())
    assert _voice_warnings(caplog) == [
        "PyNaCl is not installed, voice will NOT be supported",
        "davey is not installed, voice will NOT be supported",
    ]


class _ClientThatNeverConnects(discord.Client):
    """Built like the bot (so discord.py runs its start-up checks); `start` logs a warning of
    its own instead of connecting, to show other warnings still get through."""

    async def start(self, token: str, **options) -> None:
        logging.getLogger("discord.client").warning("another warning, still shown")


def test_python_m_bot_starts_without_voice_warnings(voice_libraries_missing, monkeypatch, caplog, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("DISCORD_TOKEN", f"{USER_ID}.{TIMESTAMP}.{SIGNATURE}")
    monkeypatch.setenv("WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("BOT_DATA_DIR", str(tmp_path / "bot"))
    # setup_logging would add a handler to the root logger for the rest of the test session.
    monkeypatch.setattr(discord.utils, "setup_logging", lambda **options: None)

    def create_bot(settings, **options) -> discord.Client:  # built where main() builds the bot
        return _ClientThatNeverConnects(intents=discord.Intents.none())

    monkeypatch.setattr(bot_main, "create_bot", create_bot)
    with caplog.at_level(logging.INFO, logger="discord"):
        assert bot_main.main() == 0
    assert _voice_warnings(caplog) == []
    assert "another warning, still shown" in caplog.messages


# --- advanced start-up: the service and the bot under `async with` ---------------------------------


def test_python_m_bot_hands_one_service_to_the_bot_and_closes_it_last(monkeypatch, tmp_path):
    """Without the message-content intent the bot runs again without it, on the same service;
    the service closes after the last bot has closed (its answers drained, its session shut)."""
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("DISCORD_TOKEN", f"{USER_ID}.{TIMESTAMP}.{SIGNATURE}")
    monkeypatch.setattr(discord.utils, "setup_logging", lambda **options: None)
    events: list[str] = []

    class Service:
        def __init__(self, settings) -> None:
            pass

        async def __aenter__(self):
            events.append("service started")
            return self

        async def __aexit__(self, *exc_info) -> None:
            events.append("service closed")

    class Bot(discord.Client):
        def __init__(self, service, message_content: bool) -> None:
            super().__init__(intents=discord.Intents.none())
            self.given, self.message_content = service, message_content

        async def start(self, token: str, **options) -> None:
            events.append(f"bot started, message content {self.message_content}, own service {self.given is None}")
            if self.message_content:
                raise discord.PrivilegedIntentsRequired(None)

        async def close(self) -> None:
            events.append("bot closed")

    def create_bot(settings, *, service=None, message_content=True) -> discord.Client:
        return Bot(service, message_content)

    monkeypatch.setattr(bot_main, "create_service", Service)
    monkeypatch.setattr(bot_main, "create_bot", create_bot)
    assert bot_main.main() == 0
    assert events == [
        "service started",
        "bot started, message content True, own service False",
        "bot closed",
        "bot started, message content False, own service False",
        "bot closed",
        "service closed",
    ]
