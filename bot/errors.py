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

from bot.replies import mark_answered, reply, still_thinking
from bot.urls import ImageFetchError
from inference.errors import Busy, InferenceError, ModelUnavailable

log = logging.getLogger(__name__)

INTERNAL_ERROR_MESSAGE = "Something went wrong on my side; it has been logged. Please try again later."


class NoImageFound(commands.UserInputError):
    """The command found no image to work on; `str(error)` says how to give it one."""


# The two gate errors are raised by the bot's check (prefix and hybrid commands) and by the
# command tree's `interaction_check` (slash commands, context menus): each framework routes to
# its error handler only its own error type, so they are both.


class ChannelNotAllowed(commands.CheckFailure, app_commands.CheckFailure):
    """The bot is configured to answer only in some channels, and this is not one of them."""


class ShuttingDown(commands.CheckFailure, app_commands.CheckFailure):
    """The bot is stopping (a restart or a deploy): it takes no new commands."""


#: What a user is told when the bot stops before (or instead of) answering.
RESTARTING_MESSAGE = "I'm restarting right now; try again in a minute."

#: Shown in place of the "thinking…" message of an interaction whose error goes to its user only.
_NOT_ANSWERED = "Could not do that one; only the person who asked can see why."


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
    if isinstance(error, ShuttingDown):
        return RESTARTING_MESSAGE
    if isinstance(error, commands.UserInputError):
        return f"{error} Try `/help`."
    if isinstance(error, (commands.BotMissingPermissions, app_commands.BotMissingPermissions)):
        return f"I'm missing a permission here: I need {permission_names(error.missing_permissions)}."
    if isinstance(error, commands.NotOwner):
        return "Only the bot's owner can do that."
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
    spoiler: bool = False,
) -> None:
    """Tell the user what went wrong (editing `placeholder` when there is one), or log it.

    `spoiler`: the error is about an image that came as a spoiler; the line may name it (a
    file name, a host), so it goes behind `||` too.  In an interaction the line is shown to the
    user who ran the command only, also after a public defer.  A placeholder deleted meanwhile
    (by a moderator) or a command message that is gone does not stop the line: it is sent as a
    new message, a reply where the command message still exists."""
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

    line = f"⚠️ ||{text}||" if spoiler else f"⚠️ {text}"
    try:
        if placeholder is not None and interaction is not None:
            # A placeholder of an interaction is public: remove it, and tell the user alone.
            try:
                await placeholder.delete()
            except discord.HTTPException as error:
                log.debug("could not delete placeholder %s: %s", placeholder.id, error)
        elif placeholder is not None:
            try:
                await placeholder.edit(content=line, embed=None, attachments=[], view=None)
                return
            except discord.NotFound:
                log.debug("placeholder %s is gone; the error goes in a new message", placeholder.id)
        if interaction is not None:
            await _tell_only_the_user(interaction, line)
        else:
            assert isinstance(target, commands.Context)
            await reply(target, line)
    except discord.HTTPException as send_error:
        # Nothing more can be said in that channel (no permission, message gone…).
        channel_id = getattr(target.channel, "id", None)
        log.warning("could not report an error in channel %s: %s", channel_id, send_error)


async def _tell_only_the_user(interaction: discord.Interaction, line: str) -> None:
    if not interaction.response.is_done():
        await interaction.response.send_message(line, ephemeral=True)
        return
    if still_thinking(interaction):
        # The next followup would *become* the public "thinking…" message: complete that with
        # a neutral line and remove it, so that the ephemeral one is a message of its own.
        await interaction.edit_original_response(content=_NOT_ANSWERED, embed=None, attachments=[])
        mark_answered(interaction)
        try:
            await interaction.delete_original_response()
        except discord.HTTPException as error:
            log.debug("could not delete the original response: %s", error)
    await interaction.followup.send(line, ephemeral=True)
    mark_answered(interaction)


def permission_names(permissions: list[str]) -> str:
    """`["attach_files", "embed_links"]` → "Attach Files and Embed Links", as Discord names them."""
    names = [name.replace("_", " ").replace("guild", "server").title() for name in permissions]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _command_name(target: commands.Context | discord.Interaction) -> str | None:
    command = target.command
    return getattr(command, "qualified_name", None)


def _user_id(target: commands.Context | discord.Interaction) -> int | None:
    if isinstance(target, discord.Interaction):
        return target.user.id
    return (target.interaction.user if target.interaction else target.author).id
