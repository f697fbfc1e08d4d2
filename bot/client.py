"""The `commands.Bot` subclass and `create_bot`, the factory the tests and `python -m bot` use.

The shape of discord.py's `examples/advanced_startup.py`: `python -m bot` builds the inference
service and the bot under `async with` and hands the one to the other; `create_bot(settings)`
given no service builds one that the bot owns (scripts and tests start the bot that way).
`setup_hook` starts the service, loads one cog per feature area and syncs the commands with
Discord when they changed since the last sync (`bot.sync`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.buttons import CancelButton, DeleteButton
from bot.chains import ChainButton
from bot.context import VisionContext
from bot.downloads import ByteBudget
from bot.errors import ChannelNotAllowed, ShuttingDown, report_error
from bot.guild_config import GuildConfig, GuildConfigStore, ServerSettings
from bot.sync import sync_if_changed
from bot.urls import ImageFetcher
from bot.waiting import WaitingRequests
from config import Settings
from inference.service import InferenceBackend
from inference.service.factory import create_service

log = logging.getLogger(__name__)

#: Extensions loaded in `setup_hook`, one cog per feature area.
EXTENSIONS = ("bot.cogs.vision", "bot.cogs.style", "bot.cogs.info", "bot.cogs.admin", "bot.cogs.config")
#: A command's `extras` key that lets it through the channel gate (`/config`: an admin who
#: narrowed the channels can widen them again from anywhere).
ANY_CHANNEL = "any_channel"


class VisionTree(app_commands.CommandTree):
    """The gate for slash commands and context menus, and their errors sent to the same
    handler as everything else."""

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.type is discord.InteractionType.autocomplete:
            # Suggestions cannot carry a refusal; the command itself is refused when run.
            return isinstance(self.client, VisionBot) and self.client.serves(interaction.channel)
        if isinstance(self.client, VisionBot):
            self.client.gate(interaction.channel, interaction.command)  # raises ShuttingDown / ChannelNotAllowed
        return True

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        await report_error(interaction, error)


class VisionBot(commands.Bot):
    """The bot: owns the inference service and the URL fetcher, and closes both on `close()`."""

    def __init__(
        self,
        settings: Settings,
        *,
        service: InferenceBackend | None = None,
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
            **shard_options(settings),
        )
        self.settings = settings
        #: What the bot closes after its Discord session, last in first out: the inference
        #: service when the bot built it, then (closed first) the URL fetcher.  A service that
        #: was handed in belongs to whoever built it (`python -m bot`: its `async with`).
        self._owned = AsyncExitStack()
        if service is None:
            service = create_service(settings)  # INFERENCE_BACKEND: worker processes or Ray Serve
            self._owned.push_async_callback(service.close)  # idempotent; fine if never started
        #: The models, behind their worker queue.
        self.service = service
        #: Fetches image links; `url_fetcher` is the seam for tests that serve images on
        #: 127.0.0.1 (an `ImageFetcher(..., allow_loopback_for_tests=True)`).
        self.fetcher = url_fetcher if url_fetcher is not None else ImageFetcher(settings)
        self._owned.push_async_callback(self.fetcher.close)
        #: Bytes being downloaded at once, across every command and user.
        self.downloads = ByteBudget(settings.max_download_bytes_in_flight)
        #: The servers' own settings (`/config`), opened in `setup_hook`; until then the bot's.
        self.guild_configs: GuildConfigStore | None = None
        #: Requests waiting in line behind a message with a Cancel button.
        self.waiting = WaitingRequests()
        #: Set when `close()` begins: no new commands from then on.
        self.stopping = False
        #: Set when the grace period is over: requests still waiting give up and say so.
        self.out_of_time = asyncio.Event()
        self._requests_in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._shutdown: asyncio.Task[None] | None = None
        # The gate for prefix and hybrid commands; `VisionTree.interaction_check` is the same
        # gate for slash commands and context menus.
        self.add_check(self.bot_check)

    async def setup_hook(self) -> None:
        await self.service.start()  # a no-op for a service that is already running
        if self.guild_configs is None:
            self.guild_configs = await GuildConfigStore.open(self.settings.database_file)
            self._owned.push_async_callback(self.guild_configs.close)
        # The buttons on the bot's messages, also on messages sent before a restart.
        self.add_dynamic_items(CancelButton, DeleteButton, ChainButton)
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        await sync_if_changed(self.tree, self.application_id, self.settings.bot_data_dir)

    async def get_context(self, origin: Any, /, *, cls: type[commands.Context[Any]] = VisionContext) -> Any:
        """Every command gets a `VisionContext` (its helpers: images, safe replies, invoker)."""
        return await super().get_context(origin, cls=cls)

    # --- requests in flight, and stopping in order --------------------------------------------
    @property
    def requests_in_flight(self) -> int:
        return self._requests_in_flight

    @asynccontextmanager
    async def request(self) -> AsyncIterator[None]:
        """Count one command's work (its downloads, queue time and answers) as in flight, so
        that `close()` waits for it.  Raises `ShuttingDown` once the bot is stopping."""
        self.ensure_running()
        self._requests_in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._requests_in_flight -= 1
            if self._requests_in_flight == 0:
                self._idle.set()

    def ensure_running(self) -> None:
        if self.stopping:
            raise ShuttingDown("the bot is shutting down")

    async def close(self) -> None:
        """Stop in order: take no new commands; let the requests in flight finish and answer
        within the grace period (`shutdown_grace_s`), then tell the ones still waiting that the
        bot is restarting; only then close Discord's HTTP session and the gateway, the URL
        fetcher, and last the inference service (when the bot created it; one handed in is
        closed by its owner after this).  Idempotent."""
        if self._shutdown is None:
            self._shutdown = asyncio.ensure_future(self._close_in_order())
        await asyncio.shield(self._shutdown)

    async def _close_in_order(self) -> None:
        self.stopping = True
        grace_s = self.settings.shutdown_grace_s
        try:
            if self._requests_in_flight:
                log.info("stopping: waiting up to %.0f s for %d request(s)", grace_s, self._requests_in_flight)
                try:
                    await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
                except asyncio.TimeoutError:
                    # Out of time: the requests still waiting stop waiting and say so; a short
                    # while for those lines to go out.
                    self.out_of_time.set()
                    self.dispatch("vision_out_of_time")  # wakes the requests waiting for a result
                    try:
                        await asyncio.wait_for(self._idle.wait(), timeout=5.0)
                    except asyncio.TimeoutError:
                        log.warning("stopping: %d request(s) did not finish", self._requests_in_flight)
        finally:
            self.waiting.stop()  # nothing is waiting any more: no more updates of places in line
            try:
                await super().close()
            finally:
                await self._owned.aclose()

    # --- one error handler -------------------------------------------------------------------
    async def on_command_error(  # type: ignore[override]
        self, ctx: commands.Context, error: commands.CommandError
    ) -> None:
        await report_error(ctx, error)

    # --- the gate: running, and an allowed channel --------------------------------------------
    def serves(self, channel: Any) -> bool:
        return not self.stopping and self.channel_allowed(channel)

    def gate(self, channel: Any, command: Any = None) -> None:
        """Raise `ShuttingDown` or `ChannelNotAllowed` when the bot does not take `command`
        from `channel` now; the one place that decides, for every kind of command."""
        self.ensure_running()
        command = getattr(command, "wrapped", command)  # a hybrid command's slash form
        if not getattr(command, "extras", {}).get(ANY_CHANNEL) and not self.channel_allowed(channel):
            raise ChannelNotAllowed("not an allowed channel")

    async def bot_check(self, ctx: commands.Context[Any]) -> bool:
        self.gate(ctx.channel, ctx.command)
        return True

    def server_settings(self, guild: discord.abc.Snowflake | None) -> ServerSettings:
        """What applies in `guild`: its own settings (`/config`) over the bot's."""
        own = self.guild_configs.get(guild.id if guild else None) if self.guild_configs else GuildConfig()
        return own.resolve(self.settings)

    def channel_allowed(self, channel: Any) -> bool:
        allowed = self.server_settings(getattr(channel, "guild", None)).allowed_channels
        if not allowed or channel is None:
            return True
        if isinstance(channel, discord.abc.PrivateChannel):
            return True  # DMs are not a server's channel to restrict
        ids = {getattr(channel, "id", None), getattr(channel, "parent_id", None)}  # threads: parent
        return bool(ids & allowed)



class ShardedVisionBot(VisionBot, commands.AutoShardedBot):
    """The bot on `SHARD_COUNT` shards (the ones in `SHARD_IDS`, or all): several bot processes
    split the guilds, each running its own shards, all sharing one Ray cluster for the models."""


def shard_options(settings: Settings) -> dict[str, Any]:
    """discord.py's shard arguments from the settings; none without sharding."""
    if settings.shard_count <= 0:
        return {}
    return {"shard_count": settings.shard_count, "shard_ids": sorted(settings.shard_ids) or None}


def create_bot(
    settings: Settings | None = None,
    *,
    service: InferenceBackend | None = None,
    url_fetcher: ImageFetcher | None = None,
    message_content: bool = True,
) -> VisionBot:
    """The bot, configured from `settings` (read from the environment and `.env` when None).

    Without `service`, the bot builds its own: started in `setup_hook`, closed by `close()`
    after the bot's session.  A `service` handed in is started by its owner (or in
    `setup_hook`, a no-op if running) and never closed by the bot.  `url_fetcher` replaces the
    one the bot builds from `settings`; `message_content=False` runs it without the
    privileged message-content intent.  Use it as `async with create_bot(...) as bot:`.
    """
    settings = settings if settings is not None else Settings.from_env()
    bot_class = ShardedVisionBot if settings.shard_count > 0 else VisionBot
    return bot_class(
        settings,
        service=service,
        url_fetcher=url_fetcher,
        message_content=message_content,
    )
