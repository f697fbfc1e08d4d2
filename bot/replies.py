"""Sending an answer: the one way the bot replies, so that every reply follows the same rules.

- A reply whose target is gone (the command message deleted meanwhile) becomes a plain
  message: `fail_if_not_exists=False` on every reference.
- Answers never ping anyone (`mention_author=False`; the bot's `allowed_mentions` do the rest).
- In an interaction, the first message after a public defer *completes* the "thinking…"
  message, and so takes its visibility whatever the message asks for.  `mark_answered` records
  that the interaction has shown something, so that the error handler knows whether an
  ephemeral line would still come out public (see `bot.errors.report_error`).
"""

from __future__ import annotations

from typing import Any

import discord
from discord.ext import commands

_ANSWERED = "vision_answered"


async def reply(ctx: commands.Context, content: str | None = None, **kwargs: Any) -> discord.Message:
    """`ctx.reply`, except that a reply to a deleted message is sent as a plain message."""
    if ctx.interaction is None:
        reference = ctx.message.to_reference(fail_if_not_exists=False)
        message = await ctx.send(content, reference=reference, mention_author=False, **kwargs)
    else:
        message = await ctx.send(content, **kwargs)
        mark_answered(ctx.interaction)
    return message


def mark_answered(interaction: discord.Interaction) -> None:
    interaction.extras[_ANSWERED] = True


def still_thinking(interaction: discord.Interaction) -> bool:
    """Whether the interaction was deferred and nothing has completed that defer yet: the next
    followup would replace the public "thinking…" message instead of being a message of its own."""
    return (
        interaction.response.type == discord.InteractionResponseType.deferred_channel_message
        and not interaction.extras.get(_ANSWERED, False)
    )
