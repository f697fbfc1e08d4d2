"""The bot's one error handler: every error becomes one short line for the user, or a log entry.

`report_error` is what `Bot.on_command_error` (prefix and hybrid commands), the command tree's
`on_error` (context menus) and the per-image loop of the model commands all call.  What the
user sees comes from `user_message`; errors it does not know are internal: the user gets a
generic apology, the log gets the traceback with the command, user, guild and channel — and
never a traceback in the channel.  The bot token is never part of any of it: no message or log
line here includes settings.
"""

from __future__ import annotations

import logging
import math

import discord
from discord import app_commands
from discord.ext import commands

from bot.urls import ImageFetchError
from inference.errors import Busy, InferenceError, ModelUnavailable

log = logging.getLogger(__name__)

INTERNAL_ERROR_MESSAGE = "Something went wrong on my side; it has been logged. Please try again later."


class NoImageFound(commands.UserInputError):
    """The command found no image to work on; `str(error)` says how to give it one."""


class ChannelNotAllowed(commands.CheckFailure):
    """The bot is configured to answer only in some channels, and this is not one of them."""


#: Wrappers discord.py puts around the error a command raised.
_WRAPPERS = (
    commands.CommandInvokeError,
    commands.HybridCommandError,
    commands.ConversionError,
    app_commands.CommandInvokeError,
    app_commands.TransformerError,
)


def unwrap(error: BaseException) -> BaseException:
    """The error a command raised, out of the wrappers discord.py put around it."""
    seen = 0
    while isinstance(error, _WRAPPERS) and seen < 5:
        inner = getattr(error, "original", None) or error.__cause__
        if inner is None:
            break
        error = inner
        seen += 1
    return error


def user_message(error: BaseException, command: str | None = None) -> str | None:
    """The line to show for a known error; None for an internal one (to be logged)."""
    if isinstance(error, Busy):
        seconds = max(1, math.ceil(error.retry_after))
        return f"I'm busy right now — try again in ~{seconds} s."
    if isinstance(error, ModelUnavailable):
        # Its message is for whoever runs the bot (file paths, download commands): logged.
        return "That model is not available on this bot right now; `/models` shows what is missing."
    if isinstance(error, (InferenceError, ImageFetchError, NoImageFound)):
        return str(error)
    if isinstance(error, (commands.CommandOnCooldown, app_commands.CommandOnCooldown)):
        seconds = max(1, math.ceil(error.retry_after))
        what = f"`{command}`" if command else "that"
        return f"Easy there — you can use {what} again in {seconds} s."
    if isinstance(error, ChannelNotAllowed):
        return "I don't answer commands in this channel."
    if isinstance(error, commands.UserInputError):
        return f"{error} Try `/help`."
    if isinstance(error, (commands.CheckFailure, app_commands.CheckFailure)):
        return "You can't use that command here."
    if isinstance(error, discord.Forbidden):
        return (
            "I'm missing a permission here: I need Send Messages, Embed Links, "
            "Attach Files and Read Message History."
        )
    return None


async def report_error(
    target: commands.Context | discord.Interaction,
    error: BaseException,
    *,
    placeholder: discord.Message | None = None,
) -> None:
    """Tell the user what went wrong (editing `placeholder` when there is one), or log it."""
    error = unwrap(error)
    if isinstance(error, commands.CommandNotFound):
        return  # "!something" that isn't ours: not a conversation with this bot
    interaction = target if isinstance(target, discord.Interaction) else target.interaction
    if isinstance(error, ChannelNotAllowed) and interaction is None:
        return  # a prefix command in a channel we don't serve: stay quiet there

    text = user_message(error, _command_name(target))
    if text is None:
        log.error(
            "command %r failed (user %s, guild %s, channel %s)",
            _command_name(target),
            _user_id(target),
            getattr(target.guild, "id", None),
            getattr(target.channel, "id", None),
            exc_info=error,
        )
        text = INTERNAL_ERROR_MESSAGE
    elif isinstance(error, ModelUnavailable):
        log.warning("command %r: model unavailable: %s", _command_name(target), error)
    else:
        log.debug("command %r: %s: %s", _command_name(target), type(error).__name__, text)

    try:
        if placeholder is not None:
            await placeholder.edit(content=f"⚠️ {text}", embed=None, attachments=[])
        elif isinstance(target, discord.Interaction):
            if target.response.is_done():
                await target.followup.send(f"⚠️ {text}", ephemeral=True)
            else:
                await target.response.send_message(f"⚠️ {text}", ephemeral=True)
        elif target.interaction is not None:
            await target.send(f"⚠️ {text}", ephemeral=True)
        else:
            await target.reply(f"⚠️ {text}", mention_author=False)
    except discord.HTTPException as send_error:
        # Nothing more can be said in that channel (no permission, message gone…).
        channel_id = getattr(target.channel, "id", None)
        log.warning("could not report an error in channel %s: %s", channel_id, send_error)


def _command_name(target: commands.Context | discord.Interaction) -> str | None:
    command = target.command
    return getattr(command, "qualified_name", None)


def _user_id(target: commands.Context | discord.Interaction) -> int | None:
    if isinstance(target, discord.Interaction):
        return target.user.id
    return (target.interaction.user if target.interaction else target.author).id
