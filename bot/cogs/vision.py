"""The model commands: classify, zebra, caption — as hybrid commands and as message context menus.

Every entry point ends in `VisionCog.answer(ctx, task, sources)`: read each image's bytes,
submit them all to the inference service at once (so one message's images can share a batch,
and `Busy` is known before anything is waited for), then answer each image in order.  When a
request has to wait behind others, each image first gets a reply with its place in line, which
is edited into the result when it is done.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot import formatting
from bot.errors import NoImageFound, report_error
from bot.sources import ImageSource, find_sources, sources_from_options
from bot.urls import ImageFetchError
from inference.errors import InferenceError
from inference.service import Ticket

if TYPE_CHECKING:
    from bot.client import VisionBot

#: Commands that hold a model for seconds: a per-user cooldown applies to them.
HEAVY_TASKS = frozenset({"zebra", "caption"})
TOP_PREDICTIONS = 5

CONTEXT_MENUS = {"classify": "Classify image", "zebra": "Zebra-fy image", "caption": "Caption image"}


class HeavyCommandCooldown:
    """A cooldown per user and command, shared by the prefix, slash and context-menu forms of
    the command (discord.py's own cooldowns would give each form a bucket of its own)."""

    def __init__(self, seconds: float) -> None:
        self._mapping: commands.CooldownMapping[tuple[int, str]] | None = (
            commands.CooldownMapping.from_cooldown(1, seconds, lambda key: key) if seconds > 0 else None
        )

    def hit(self, user: discord.abc.User, task: str) -> None:
        """Count a use; raises `CommandOnCooldown` while the user is still cooling down."""
        if self._mapping is None:
            return
        bucket = self._mapping.get_bucket((user.id, task))
        assert bucket is not None
        retry_after = bucket.update_rate_limit()
        if retry_after:
            raise commands.CommandOnCooldown(bucket, retry_after, commands.BucketType.user)

    def forgive(self, user: discord.abc.User, task: str) -> None:
        """Undo the last use: nothing ran (everything was refused), so nothing to cool down from."""
        if self._mapping is not None:
            bucket = self._mapping.get_bucket((user.id, task))
            if bucket is not None:
                bucket.reset()


@dataclass
class _Job:
    source: ImageSource
    ticket: Ticket | None = None
    error: Exception | None = None
    #: Requests ahead of this one when it was submitted.
    ahead: int = 0
    placeholder: discord.Message | None = None


@dataclass(frozen=True)
class _Answer:
    """One image's answer: what goes into the reply (or into the placeholder, edited)."""

    content: str | None = None
    embed: discord.Embed | None = None
    file: discord.File | None = None


def usage(task: str, prefix: str) -> str:
    menu = CONTEXT_MENUS[task]
    return (
        f"I need an image for that. Attach a photo to `{prefix}{task}`, put an image link after it, "
        f"or reply to a message that has one — or use `/{task}`, or Apps → **{menu}** on a message."
    )


def invoker(ctx: commands.Context) -> discord.abc.User:
    """Who asked (in a context menu, `ctx.author` is the author of the *target* message)."""
    return ctx.interaction.user if ctx.interaction is not None else ctx.author


class VisionCog(commands.Cog, name="Vision"):
    def __init__(self, bot: VisionBot) -> None:
        self.bot = bot
        self.heavy_cooldown = HeavyCommandCooldown(bot.settings.heavy_command_cooldown_s)
        # Context menus cannot be declared in a cog with a decorator; they are built here and
        # added to the tree when the cog loads.
        self.menus = [
            app_commands.ContextMenu(name=CONTEXT_MENUS["classify"], callback=self.classify_menu),
            app_commands.ContextMenu(name=CONTEXT_MENUS["zebra"], callback=self.zebra_menu),
            app_commands.ContextMenu(name=CONTEXT_MENUS["caption"], callback=self.caption_menu),
        ]

    async def cog_load(self) -> None:
        for menu in self.menus:
            self.bot.tree.add_command(menu)

    async def cog_unload(self) -> None:
        for menu in self.menus:
            self.bot.tree.remove_command(menu.name, type=menu.type)

    # --- hybrid commands ------------------------------------------------------------------------
    @commands.hybrid_command(description="Say what is in a photo: the top 5 ImageNet classes.")
    @app_commands.describe(image="The photo", url="Or: a link to the photo")
    async def classify(
        self, ctx: commands.Context, image: discord.Attachment | None = None, *, url: str | None = None
    ) -> None:
        await self.answer(ctx, "classify", await self._sources(ctx, image, url))

    @commands.hybrid_command(description="Turn the horses in a photo into zebras.")
    @app_commands.describe(image="The photo", url="Or: a link to the photo")
    async def zebra(
        self, ctx: commands.Context, image: discord.Attachment | None = None, *, url: str | None = None
    ) -> None:
        await self.answer(ctx, "zebra", await self._sources(ctx, image, url))

    @commands.hybrid_command(description="Describe a photo in one sentence.")
    @app_commands.describe(image="The photo", url="Or: a link to the photo")
    async def caption(
        self, ctx: commands.Context, image: discord.Attachment | None = None, *, url: str | None = None
    ) -> None:
        await self.answer(ctx, "caption", await self._sources(ctx, image, url))

    async def _sources(
        self, ctx: commands.Context, image: discord.Attachment | None, url: str | None
    ) -> list[ImageSource]:
        limit = self.bot.settings.max_images_per_message
        if ctx.interaction is None:
            # A message: all its attachments (the `image` argument is the first of them), its
            # links, else the message it replies to.
            return await find_sources(ctx.message, limit=limit)
        return sources_from_options(image, url, limit=limit)

    # --- context menus ----------------------------------------------------------------------------
    async def classify_menu(self, interaction: discord.Interaction, message: discord.Message) -> None:
        await self._answer_menu(interaction, message, "classify")

    async def zebra_menu(self, interaction: discord.Interaction, message: discord.Message) -> None:
        await self._answer_menu(interaction, message, "zebra")

    async def caption_menu(self, interaction: discord.Interaction, message: discord.Message) -> None:
        await self._answer_menu(interaction, message, "caption")

    async def _answer_menu(
        self, interaction: discord.Interaction, message: discord.Message, task: str
    ) -> None:
        # The interaction carries the whole target message, content included: this works
        # without the message-content intent.
        self.bot.ensure_channel_allowed(interaction.channel)
        ctx = await self.bot.get_context(interaction)
        sources = await find_sources(message, limit=self.bot.settings.max_images_per_message)
        if not sources:
            raise NoImageFound("That message has no image I can use (no attachment, image embed or link).")
        await self.answer(ctx, task, sources)

    # --- the work ---------------------------------------------------------------------------------
    async def answer(self, ctx: commands.Context, task: str, sources: list[ImageSource]) -> None:
        if not sources:
            raise NoImageFound(usage(task, self.bot.settings.command_prefix))
        user = invoker(ctx)
        if task in HEAVY_TASKS:
            self.heavy_cooldown.hit(user, task)

        async with ctx.typing():
            jobs = [_Job(source) for source in sources]
            try:
                await self._submit(task, jobs, user)
                if not any(job.ticket is not None for job in jobs) and task in HEAVY_TASKS:
                    self.heavy_cooldown.forgive(user, task)  # nothing ran: no reason to wait
                if any(job.ahead > 0 for job in jobs):
                    # Someone is ahead: every image gets its reply now, in order, showing its
                    # place in line; each is edited into its result below.
                    for job in jobs:
                        if job.ticket is not None:
                            text = formatting.queue_message(job.ahead)
                            job.placeholder = await ctx.reply(text, mention_author=False)
                for job in jobs:
                    await self._answer_job(ctx, task, job)
            finally:
                for job in jobs:  # the caller is gone (error, cancellation): free the queue
                    if job.ticket is not None and not job.ticket.done():
                        job.ticket.cancel()

    async def _submit(self, task: str, jobs: list[_Job], user: discord.abc.User) -> None:
        options: dict[str, Any] = {"top": TOP_PREDICTIONS} if task == "classify" else {}
        for job in jobs:
            try:
                data = await job.source.read(self.bot.fetcher)
                job.ticket = self.bot.service.submit(task, data, user=user.id, **options)
            except (ImageFetchError, InferenceError) as error:
                job.error = error
                continue
            job.ahead = job.ticket.position()

    async def _answer_job(self, ctx: commands.Context, task: str, job: _Job) -> None:
        if job.error is not None:
            await report_error(ctx, job.error, placeholder=job.placeholder)
            return
        assert job.ticket is not None
        try:
            result = await job.ticket
        except InferenceError as error:
            await report_error(ctx, error, placeholder=job.placeholder)
            return
        answer = await self._render(ctx, task, job.source, result)
        if job.placeholder is not None:
            await job.placeholder.edit(
                content=answer.content, embed=answer.embed, attachments=[answer.file] if answer.file else []
            )
        else:
            await ctx.reply(answer.content, embed=answer.embed, file=answer.file, mention_author=False)

    async def _render(self, ctx: commands.Context, task: str, source: ImageSource, result: Any) -> _Answer:
        label, spoiler = source.label, source.spoiler
        if task == "classify":
            model = self._model_name("classify")
            embed = formatting.classification_embed(result, source=label, model=model, spoiler=spoiler)
            return _Answer(embed=embed)
        if task == "caption":
            return _Answer(content=formatting.caption_message(result, source=label, spoiler=spoiler))
        if task == "zebra":
            limit = formatting.upload_limit(ctx.guild)
            # Re-encoding a large image is CPU work: not on the event loop.
            encoded = await asyncio.to_thread(formatting.fit_upload, result, limit)
            file = formatting.image_file(encoded, stem="zebra", spoiler=spoiler)
            return _Answer(content=formatting.zebra_message(label), file=file)
        raise ValueError(f"unknown task {task!r}")

    def _model_name(self, task: str) -> str:
        for state in self.bot.service.models():
            if state.task == task:
                return state.model
        return task


async def setup(bot: VisionBot) -> None:
    await bot.add_cog(VisionCog(bot))
