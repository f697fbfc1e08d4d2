"""Commands for whoever runs the bot: `sync`, owner only.

A prefix command only (`!sync`, or @mention the bot): it stays out of the slash-command list
that every member sees, and works before any slash command has been synced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from discord.ext import commands

from bot.context import VisionContext
from bot.sync import sync_commands

if TYPE_CHECKING:
    from bot.client import VisionBot


class AdminCog(commands.Cog, name="Admin"):
    def __init__(self, bot: VisionBot) -> None:
        self.bot = bot

    @commands.command(hidden=True)
    @commands.is_owner()
    async def sync(self, ctx: VisionContext) -> None:
        """Sync the application commands with Discord now, changed or not (the bot syncs by
        itself at start-up when they changed; this is for a tree changed behind its back)."""
        count = await sync_commands(self.bot.tree, self.bot.application_id, self.bot.settings.bot_data_dir)
        await ctx.reply_safely(f"Synced {count} application commands.")


async def setup(bot: VisionBot) -> None:
    await bot.add_cog(AdminCog(bot))
