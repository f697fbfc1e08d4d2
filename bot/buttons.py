"""The buttons on the bot's messages: **Cancel** on a request waiting in line, **Delete** on
every answer (beside its chain buttons: `bot.chains`).  Who may press them: the person who
asked, or a member with Manage Messages; anyone else gets a private refusal.

Both are `DynamicItem`s whose `custom_id` carries the requester's id, registered with
`bot.add_dynamic_items` in `setup_hook`: **Delete** keeps working after the bot restarts, and a
**Cancel** pressed after its request finished (or after a restart) says so privately.  The
waiting requests themselves are the bot's `WaitingRequests`, by the id of their message.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import discord

from bot.waiting import WaitingRequests

log = logging.getLogger(__name__)

NOT_YOURS = "This isn't your request: only the person who asked (or a moderator) can do that."
ALREADY_DONE = "That request is no longer waiting."
CANCELLED = "🚫 Cancelled before it reached the model."


def may_act_for(interaction: discord.Interaction, requester_id: int) -> bool:
    """The requester, or someone allowed to manage messages in that channel."""
    if interaction.user.id == requester_id:
        return True
    permissions = interaction.permissions
    return bool(permissions.manage_messages or permissions.administrator)


class CancelButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"vision:cancel:(?P<user>[0-9]{1,20})"):
    """Cancel on a "you're in line" message.  A `DynamicItem` too, so that a press that comes
    after the request finished (or after a restart) is told so instead of failing."""

    def __init__(self, requester_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Cancel", style=discord.ButtonStyle.secondary, emoji="✖️", custom_id=f"vision:cancel:{requester_id}"
            )
        )
        self.requester_id = requester_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> CancelButton:
        return cls(int(match["user"]))

    async def interaction_check(self, interaction: discord.Interaction[Any]) -> bool:
        return await _check(interaction, self.requester_id)

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        line: WaitingRequests | None = getattr(interaction.client, "waiting", None)
        message_id = interaction.message.id if interaction.message is not None else 0
        waiting = line.get(message_id) if line is not None else None
        if waiting is None or waiting.ticket.done():  # answered, failed or cancelled
            await interaction.response.send_message(ALREADY_DONE, ephemeral=True)
            return
        waiting.cancelled = True  # the ticker leaves it alone from now on
        waiting.ticket.cancel()  # out of the line before it costs model time
        if not waiting.editing.locked():
            # The press's own response edits the message: no API call of its own.
            await interaction.response.edit_message(content=CANCELLED, embed=None, attachments=[], view=None)
            return
        # The ticker is updating its place in line: acknowledge now, say so once that edit is in.
        await interaction.response.defer()
        async with waiting.editing:
            await interaction.edit_original_response(content=CANCELLED, embed=None, attachments=[], view=None)


def cancel_view(requester_id: int) -> discord.ui.View:
    """The buttons of a "you're in line" message."""
    view = discord.ui.View(timeout=None)
    view.add_item(CancelButton(requester_id))
    return view


async def _check(interaction: discord.Interaction[Any], requester_id: int) -> bool:
    if may_act_for(interaction, requester_id):
        return True
    await interaction.response.send_message(NOT_YOURS, ephemeral=True)
    return False


class DeleteButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"vision:delete:(?P<user>[0-9]{1,20})"):
    """Delete on an answer; survives restarts (the requester's id is in the `custom_id`)."""

    def __init__(self, requester_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Delete",
                style=discord.ButtonStyle.secondary,
                emoji="🗑️",
                custom_id=f"vision:delete:{requester_id}",
            )
        )
        self.requester_id = requester_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> DeleteButton:
        return cls(int(match["user"]))

    async def interaction_check(self, interaction: discord.Interaction[Any]) -> bool:
        return await _check(interaction, self.requester_id)

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        await interaction.response.defer()  # acknowledged as an update of the answer
        try:
            await interaction.delete_original_response()  # the message the button is on
        except discord.NotFound:
            log.debug("answer %s was already gone", getattr(interaction.message, "id", None))


def answer_view(requester_id: int, chains: Sequence[discord.ui.Item[Any]] = ()) -> discord.ui.View:
    """The buttons of an answer: its chains (`bot.chains`), then Delete (all persistent)."""
    view = discord.ui.View(timeout=None)
    for chain in chains:
        view.add_item(chain)
    view.add_item(DeleteButton(requester_id))
    return view
