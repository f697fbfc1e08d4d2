"""Chain buttons on answers: run another task on the same picture in one press.

- **Caption this** / **Classify this** on a zebra (or `/style`) answer: on the generated image,
  the answer's own attachment.
- **Zebra-fy** on a classify or caption answer: on the original image, found again in the
  message it came from (`bot.sources.find_sources`: its attachments, links or the message it
  replies to).  A slash command's image was in no message: its answers get no Zebra-fy.

Each is a `DynamicItem` whose `custom_id` says where the image is (`vision:run:TASK:here`, or
`vision:run:TASK:CHANNEL:MESSAGE:INDEX`; at most 62 characters), so it keeps working after a
restart.  Anyone may press one: the presser asks, and the request goes through everything a
command goes through (the channel gate, the cooldown, the per-user cap, `Busy`).  A press whose
image is gone (its message deleted) is told so privately.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import discord
from discord.ext.commands.view import StringView

from bot.context import VisionContext
from bot.errors import report_error
from bot.sources import ImageSource, find_sources, sources_in_message

if TYPE_CHECKING:
    from bot.client import VisionBot

log = logging.getLogger(__name__)

SOURCE_GONE = "The original image is gone (its message was deleted), so there is nothing to run that on."
#: Task → the button's label and emoji.
CHAIN_LABELS = {
    "caption": ("Caption this", "📝"),
    "classify": ("Classify this", "🔎"),
    "zebra": ("Zebra-fy", "🦓"),
}
#: An answer's task → the chains it offers, and whether they run on the answer's own image.
CHAINS_ON: dict[str, tuple[tuple[str, ...], bool]] = {
    "zebra": (("caption", "classify"), True),
    "classify": (("zebra",), False),
    "caption": (("zebra",), False),
}


@dataclass(frozen=True)
class ImageRef:
    """Where an image is: the `index`-th image `find_sources` finds in a message."""

    channel_id: int
    message_id: int
    index: int = 0

    def nth(self, offset: int) -> ImageRef:
        return ImageRef(self.channel_id, self.message_id, self.index + offset)

    @classmethod
    def of(cls, message: discord.Message) -> ImageRef:
        return cls(message.channel.id, message.id)


class ChainButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=(
        r"vision:run:(?P<task>classify|caption|zebra):"
        r"(?:here|(?P<channel>[0-9]{1,20}):(?P<message>[0-9]{1,20}):(?P<index>[0-9]{1,2}))"
    ),
):
    """Run `task` on the answer's own image (`source` None) or on the image at `source`."""

    def __init__(self, task: str, source: ImageRef | None = None) -> None:
        where = "here" if source is None else f"{source.channel_id}:{source.message_id}:{source.index}"
        label, emoji = CHAIN_LABELS[task]
        super().__init__(
            discord.ui.Button(
                label=label, emoji=emoji, style=discord.ButtonStyle.secondary, custom_id=f"vision:run:{task}:{where}"
            )
        )
        self.task = task
        self.source = source

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> ChainButton:
        if match["channel"] is None:
            return cls(match["task"])
        return cls(match["task"], ImageRef(int(match["channel"]), int(match["message"]), int(match["index"])))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        bot: VisionBot = interaction.client  # type: ignore[assignment]
        try:
            bot.gate(interaction.channel)  # shutting down, or a channel the bot does not serve
            found = await self._image(interaction)
        except Exception as error:  # noqa: BLE001 - every error is answered the one way
            await report_error(interaction, error)
            return
        if found is None:
            await interaction.response.send_message(SOURCE_GONE, ephemeral=True)
            return
        source, where = found
        vision = bot.get_cog("Vision")
        if vision is None:
            return
        # A new message answers ("thinking…" until then): the answer pressed stays as it is.
        await interaction.response.defer(thinking=True)
        # The context of the command it runs (its name in the lines the user sees, the cooldown).
        command = bot.get_command(self.task)
        ctx = VisionContext(
            message=interaction.message, bot=bot, view=StringView(""), interaction=interaction, command=command
        )
        try:
            await vision.answer(ctx, self.task, [source], origin=where)  # type: ignore[attr-defined]
        except Exception as error:  # noqa: BLE001 - cooldown, no image…: said the one way
            await report_error(ctx, error)

    async def _image(self, interaction: discord.Interaction[Any]) -> tuple[ImageSource, ImageRef] | None:
        """The image to run on and where it is; None when it is gone."""
        if self.source is None:
            message = interaction.message
            sources = sources_in_message(message) if message is not None else []
            return (sources[0], ImageRef.of(message)) if sources and message is not None else None
        message = await _fetch_message(interaction.client, self.source)
        if message is None:
            return None
        sources = await find_sources(message)
        if self.source.index >= len(sources):
            return None
        return sources[self.source.index], self.source


async def _fetch_message(client: discord.Client, where: ImageRef) -> discord.Message | None:
    channel = client.get_channel(where.channel_id)
    try:
        if channel is None:
            channel = await client.fetch_channel(where.channel_id)
        return await channel.fetch_message(where.message_id)  # type: ignore[union-attr]
    except (discord.NotFound, discord.Forbidden):
        log.debug("the image of a chain button is gone (message %s)", where.message_id)
        return None


def chain_buttons(task: str, source: ImageRef | None) -> list[ChainButton]:
    """The chain buttons of an answer of `task` whose image is at `source` (None: unknown)."""
    chains, on_answer = CHAINS_ON.get(task, ((), False))
    if on_answer:
        return [ChainButton(chain) for chain in chains]
    return [ChainButton(chain, source) for chain in chains] if source is not None else []
