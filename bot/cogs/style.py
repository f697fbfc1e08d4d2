"""`/style NAME` and `!style NAME`: a photo repainted by one generator of the CycleGAN zoo
(Monet, Van Gogh, ukiyo-e, Cézanne, summer ↔ winter, zebra → horse…).

The styles are the `zebra` task's models (`list_models(task="zebra")`: one per entry of the
weights catalogue), so a style added to `inference.catalogue` is offered here with nothing else
to edit.  The request is a zebra request naming its model (`model` option); the zebra worker
keeps a few generators loaded.  Weights that are not on disk are found before anything is
queued (a `stat` per file, off the event loop): the answer is then the one line that fetches
them, unless `AUTO_DOWNLOAD` lets the worker fetch them on first use.  `!zebra` stays as it is.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.cogs.vision import VisionCog, answer_permissions
from bot.context import VisionContext
from bot.errors import NoImageFound
from inference.errors import InferenceError
from inference.registry import get_model, list_models
from inference.service.types import missing_weights

if TYPE_CHECKING:
    from bot.client import VisionBot

#: Discord shows at most 25 suggestions.
MAX_SUGGESTIONS = 25


class UnknownStyle(InferenceError):
    """A style the catalogue does not have; `str(error)` names the ones it has."""


class StyleWeightsMissing(InferenceError):
    """A style whose weights are not on disk (and AUTO_DOWNLOAD is off)."""


def styles() -> list[str]:
    return list_models(task="zebra")


def find_style(name: str) -> str:
    """A style by its name, or the short name people use (`monet` → `style_monet`)."""
    key = name.strip().lower().replace(" ", "_")
    for candidate in (key, f"style_{key}"):
        if candidate in styles():
            return candidate
    raise UnknownStyle(f"Unknown style `{name[:40]}`: use {', '.join(f'`{s}`' for s in styles())}.")


def style_label(name: str) -> str:
    """`style_monet — photo → Monet style`, for a suggestion (at most 100 characters)."""
    what = get_model(name, task="zebra").description.removeprefix("CycleGAN ").split(" generator")[0]
    return f"{name} — {what}"[:100]


class StyleCog(commands.Cog, name="Style"):
    def __init__(self, bot: VisionBot) -> None:
        self.bot = bot

    @commands.hybrid_command(name="style", description="Repaint a photo in a CycleGAN style (Monet, Van Gogh, winter…).")
    @answer_permissions("zebra")
    @app_commands.describe(name="The style (start typing)", image="The photo", url="Or: a link to the photo")
    async def style(
        self,
        ctx: VisionContext,
        name: str,
        image: discord.Attachment | None = None,
        *,
        url: str | None = None,
    ) -> None:
        style = find_style(name)
        await self.check_weights(style)
        sources = await ctx.images(image, url)
        if not sources:
            raise NoImageFound(f"I need an image for that: attach a photo to `/style {style}`, or give its link.")
        vision = self.bot.get_cog("Vision")
        assert isinstance(vision, VisionCog)
        ctx.requested_model = style
        await vision.answer(ctx, "zebra", sources)

    @style.autocomplete("name")
    async def style_names(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        typed = current.strip().lower()
        found = [name for name in styles() if typed in name]
        return [app_commands.Choice(name=style_label(name), value=name) for name in found[:MAX_SUGGESTIONS]]

    async def check_weights(self, style: str) -> None:
        """`StyleWeightsMissing` with the command that fetches them, before anything is queued."""
        if self.bot.settings.auto_download:
            return  # the worker downloads them on first use
        missing = await asyncio.to_thread(missing_weights, self.bot.settings.weights_dir, {style})
        if missing.get(style):
            raise StyleWeightsMissing(f"Missing weights for `{style}`: run `{missing[style][0].command}`.")


async def setup(bot: VisionBot) -> None:
    await bot.add_cog(StyleCog(bot))
