"""`/config [setting] [value]`: a server's own settings (`bot.guild_config`).

None → every setting; `setting` → that one; both → set it (`default` removes the server's own
value).  Anyone may look; only members with Manage Server may change, and the others are told
so privately.  A bad name or value gets one line saying why, also privately.  The command
passes the channel gate (`ANY_CHANNEL`): an admin who narrowed the channels can widen them
again from any channel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.client import ANY_CHANNEL
from bot.context import VisionContext
from bot.guild_config import (
    DESCRIPTIONS,
    RESET,
    SETTING_NAMES,
    Choices,
    InvalidSetting,
    check_name,
    parse,
    show,
)
from inference.tasks import TASK_SPECS

if TYPE_CHECKING:
    from bot.client import VisionBot

REFUSAL = "⚠️ Only members with the Manage Server permission can change this server's settings."


class ConfigCog(commands.Cog, name="Config"):
    def __init__(self, bot: VisionBot) -> None:
        self.bot = bot

    @commands.hybrid_command(
        name="config", description="Show or change this server's settings.", extras={ANY_CHANNEL: True}
    )
    @commands.guild_only()
    @app_commands.describe(setting="channels, cooldown, max_images or classifier", value="The new value, or `default`")
    async def config(self, ctx: VisionContext, setting: str | None = None, *, value: str | None = None) -> None:
        assert ctx.guild is not None  # guild_only
        try:
            name = check_name(setting) if setting is not None else None
            if name is None or value is None:
                await ctx.reply_safely(self.describe(ctx.guild, name), ephemeral=True)
                return
            if not _may_change(ctx):
                await ctx.reply_safely(REFUSAL, ephemeral=True)
                return
            parsed = None if value.strip().lower() == RESET else parse(name, value, self.choices(ctx.guild))
        except InvalidSetting as error:
            await ctx.reply_safely(f"⚠️ {error}", ephemeral=True)
            return
        assert self.bot.guild_configs is not None  # opened in setup_hook
        await self.bot.guild_configs.set(ctx.guild.id, name, parsed)
        await ctx.reply_safely(f"✅ {self.describe(ctx.guild, name)}")

    @config.autocomplete("setting")
    async def setting_names(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return [app_commands.Choice(name=n, value=n) for n in SETTING_NAMES if current.lower() in n]

    @config.autocomplete("value")
    async def setting_values(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        setting = interaction.namespace.setting
        suggestions = {
            "channels": ["all"],
            "classifier": self.choices(interaction.guild).classifiers if interaction.guild else [],
        }.get(str(setting), [])
        return [app_commands.Choice(name=v, value=v) for v in [*suggestions, RESET] if current.lower() in v][:25]

    def choices(self, guild: discord.Guild | None) -> Choices:
        channels = frozenset(channel.id for channel in guild.channels) if guild else frozenset()
        return Choices(channels, TASK_SPECS["classify"].model_choices(self.bot.settings))

    def describe(self, guild: discord.Guild, name: str | None) -> str:
        """The settings (or one), as they apply in `guild`, each marked as the server's or the bot's."""
        assert self.bot.guild_configs is not None
        own = self.bot.guild_configs.get(guild.id)
        applied = own.resolve(self.bot.settings)
        lines = []
        for setting in SETTING_NAMES if name is None else (name,):
            value = {
                "channels": applied.allowed_channels,
                "cooldown": applied.heavy_command_cooldown_s,
                "max_images": applied.max_images_per_message,
                "classifier": applied.classifier,
            }[setting]
            whose = "this server's" if own.value(setting) is not None else "the bot's default"
            lines.append(f"**{setting}**: {show(setting, value)} ({whose}) — {DESCRIPTIONS[setting]}")
        return "\n".join(lines)


def _may_change(ctx: VisionContext) -> bool:
    author = ctx.interaction.user if ctx.interaction is not None else ctx.author
    permissions = getattr(author, "guild_permissions", None)
    return bool(permissions is not None and permissions.manage_guild)


async def setup(bot: VisionBot) -> None:
    await bot.add_cog(ConfigCog(bot))
