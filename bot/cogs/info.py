"""`help`, `models` and `status`: what the bot does, which models are loaded or missing, and
how each one is doing (its queue, how fast it answers)."""

from __future__ import annotations

import asyncio
import platform
from typing import TYPE_CHECKING

import discord
from discord.ext import commands

from bot import formatting
from bot.context import VisionContext

if TYPE_CHECKING:
    from bot.client import VisionBot


class InfoCog(commands.Cog, name="Info"):
    def __init__(self, bot: VisionBot) -> None:
        self.bot = bot

    @commands.hybrid_command(name="help", description="What I can do and how to give me a photo.")
    @commands.bot_has_permissions(send_messages=True, embed_links=True)
    async def help_command(self, ctx: VisionContext) -> None:
        # Without the message-content intent the bot cannot read `!commands`: not offered then.
        embed = formatting.help_embed(self.bot.settings.command_prefix, prefix_commands=ctx.prefix_commands)
        await ctx.reply_safely(embed=embed)

    @commands.hybrid_command(description="Which models are loaded, and what is missing.")
    @commands.bot_has_permissions(send_messages=True, embed_links=True)
    async def models(self, ctx: VisionContext) -> None:
        # The service looks at its weights directory (the disk): not on the event loop.
        states = await asyncio.to_thread(self.bot.service.models)
        await ctx.reply_safely(embed=formatting.models_embed(states))

    @commands.hybrid_command(description="Each model's state, its queue and how fast it answers.")
    @commands.bot_has_permissions(send_messages=True, embed_links=True)
    async def status(self, ctx: VisionContext) -> None:
        # `models()` looks at the weights directory (the disk): not on the event loop.
        states = await asyncio.to_thread(self.bot.service.models)
        versions = f"discord.py {discord.__version__} · Python {platform.python_version()}"
        await ctx.reply_safely(embed=formatting.status_embed(states, self.bot.service.stats(), versions))


async def setup(bot: VisionBot) -> None:
    await bot.add_cog(InfoCog(bot))
