"""`help` and `models`: what the bot does, and which models are loaded or missing."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from discord.ext import commands

from bot import formatting
from inference.weights import WeightsStore

if TYPE_CHECKING:
    from bot.client import VisionBot


class InfoCog(commands.Cog, name="Info"):
    def __init__(self, bot: VisionBot) -> None:
        self.bot = bot

    @commands.hybrid_command(name="help", description="What I can do and how to give me a photo.")
    async def help_command(self, ctx: commands.Context) -> None:
        await ctx.reply(embed=formatting.help_embed(self.bot.settings.command_prefix), mention_author=False)

    @commands.hybrid_command(description="Which models are loaded, and what is missing.")
    async def models(self, ctx: commands.Context) -> None:
        states = self.bot.service.models()
        # Looking at the weights directory touches the disk: not on the event loop.
        weights = await asyncio.to_thread(WeightsStore.from_settings(self.bot.settings).status)
        await ctx.reply(embed=formatting.models_embed(states, weights), mention_author=False)


async def setup(bot: VisionBot) -> None:
    await bot.add_cog(InfoCog(bot))
