"""The `commands.Bot` subclass and `create_bot`, the factory the tests and `python -m bot` use."""

from __future__ import annotations

import logging

import discord
from discord import app_commands
from discord.ext import commands

from bot.errors import ChannelNotAllowed, report_error
from bot.urls import ImageFetcher
from config import Settings
from inference.service import InferenceService

log = logging.getLogger(__name__)

#: Extensions loaded in `setup_hook`, one cog per feature area.
EXTENSIONS = ("bot.cogs.vision", "bot.cogs.info")


class VisionTree(app_commands.CommandTree):
    """Sends app-command errors (context menus) to the same handler as everything else."""

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        await report_error(interaction, error)


class VisionBot(commands.Bot):
    """The bot: owns the inference service and the URL fetcher, and closes both on `close()`."""

    def __init__(
        self,
        settings: Settings,
        *,
        service: InferenceService | None = None,
        url_fetcher: ImageFetcher | None = None,
        message_content: bool = True,
    ) -> None:
        intents = discord.Intents.default()
        # Privileged (switched on in the developer portal): lets the bot read prefix commands
        # and image links in messages.  Without it, slash commands, the context menus and
        # commands that @mention the bot still work.
        intents.message_content = message_content
        super().__init__(
            command_prefix=commands.when_mentioned_or(settings.command_prefix),
            intents=intents,
            help_command=None,  # our own hybrid `help` replaces it
            tree_cls=VisionTree,
            # Answers never ping anyone, whatever a caption or a file name says.
            allowed_mentions=discord.AllowedMentions.none(),
        )
        self.settings = settings
        #: The models, behind their worker queue.  Created here unless one is given (to share
        #: one service between several front ends, or between tests): the bot closes only the
        #: service it created.
        self.service = service if service is not None else InferenceService(settings)
        self._owns_service = service is None
        #: Fetches image links; `url_fetcher` is the seam for tests that serve images on
        #: 127.0.0.1 (an `ImageFetcher(..., allow_loopback_for_tests=True)`).
        self.fetcher = url_fetcher if url_fetcher is not None else ImageFetcher(settings)
        self.add_check(self._check_channel)

    async def setup_hook(self) -> None:
        await self.service.start()  # a no-op for a service that is already running
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        synced = await self.tree.sync()
        log.info("synced %d application commands", len(synced))

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            await self.fetcher.close()
            if self._owns_service:
                await self.service.close()  # idempotent; fine on a never-started service

    # --- one error handler -------------------------------------------------------------------
    async def on_command_error(  # type: ignore[override]
        self, ctx: commands.Context, error: commands.CommandError
    ) -> None:
        await report_error(ctx, error)

    # --- allowed channels --------------------------------------------------------------------
    def channel_allowed(self, channel: discord.abc.Messageable | None) -> bool:
        allowed = self.settings.allowed_channels
        if not allowed or channel is None:
            return True
        if isinstance(channel, discord.abc.PrivateChannel):
            return True  # DMs are not a server's channel to restrict
        ids = {getattr(channel, "id", None), getattr(channel, "parent_id", None)}  # threads: parent
        return bool(ids & allowed)

    def ensure_channel_allowed(self, channel: discord.abc.Messageable | None) -> None:
        if not self.channel_allowed(channel):
            raise ChannelNotAllowed("not an allowed channel")

    async def _check_channel(self, ctx: commands.Context) -> bool:
        self.ensure_channel_allowed(ctx.channel)
        return True


def create_bot(
    settings: Settings | None = None,
    *,
    service: InferenceService | None = None,
    url_fetcher: ImageFetcher | None = None,
    message_content: bool = True,
) -> VisionBot:
    """The bot, configured from `settings` (read from the environment and `.env` when None).

    Its inference service is started in `setup_hook` and closed by `close()`.  `service` and
    `url_fetcher` replace the ones the bot would build from `settings` (see `VisionBot`);
    `message_content=False` runs it without the privileged message-content intent.
    """
    return VisionBot(
        settings if settings is not None else Settings.from_env(),
        service=service,
        url_fetcher=url_fetcher,
        message_content=message_content,
    )
