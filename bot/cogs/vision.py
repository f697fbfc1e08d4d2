"""The model commands, one per task of `inference.tasks` (classify, zebra, caption): each as a
hybrid command (`!task`, `/task`) and as a message context menu, generated from the task specs.

Every entry point ends in `VisionCog.answer(ctx, task, sources)`: ask the inference service for
slots for the message's images first (`reserve`: a user at their cap or a full queue costs no
download), then download each granted image within the bot-wide byte budget and submit it (so
one message's images can share a batch), then answer each image in order.  When a request has
to wait behind others, each image first gets a reply with its place in line, its estimated
wait and a Cancel button, kept up to date while it waits (`bot.waiting`) and edited into the
result when it is done.  Every answer carries a Delete button, and chain buttons that run
another task on the same picture (`bot.chains`).

Each image is answered on its own: a placeholder deleted by a moderator, a missing permission
or a command message that is gone costs that one answer at most, never the others.  Anything
that came as a spoiler goes out as one (its name, its preview, its answer).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import discord
from discord import app_commands
from discord.ext import commands

from bot import formatting
from bot.buttons import answer_view, cancel_view
from bot.chains import ImageRef, chain_buttons
from bot.context import VisionContext
from bot.errors import NoImageFound, report_error
from bot.sources import ImageSource, find_sources, needs_fetch
from bot.urls import ImageFetchError
from bot.waiting import Waiting, result_or_restart
from inference.errors import InferenceError
from inference.service import Ticket
from inference.tasks import TASK_SPECS, TaskSpec

if TYPE_CHECKING:
    from bot.client import VisionBot

log = logging.getLogger(__name__)

T = TypeVar("T")

#: What the bot needs in a channel to answer at all: send (a reply: read the history it
#: replies to), and embeds (classify's answer, errors and help).  Checked before any download
#: or model time, so a missing one is one clear line instead of a failed answer per image.
ANSWER_PERMISSIONS: dict[str, bool] = {"send_messages": True, "read_message_history": True, "embed_links": True}
#: What some tasks' answers need on top: zebra's answer is a file.
EXTRA_PERMISSIONS: dict[str, dict[str, bool]] = {"zebra": {"attach_files": True}}

#: Context-menu names that are not "<Title> image" (a new task gets that one by itself).
#: Discord allows an app five message context menus: new styles go to a `/style` option.
_MENU_NAMES = {"zebra": "Zebra-fy image"}


def menu_name(spec: TaskSpec) -> str:
    return _MENU_NAMES.get(spec.name) or f"{spec.title.capitalize()} image"


def permissions_for(task: str) -> dict[str, bool]:
    return {**ANSWER_PERMISSIONS, **EXTRA_PERMISSIONS.get(task, {})}


def answer_permissions(task: str) -> Callable[[T], T]:
    """`bot_has_permissions` for a prefix command's answer.  An interaction's answers (slash,
    context menu) are webhook messages that Discord always lets send, embed and attach, and
    that reply to nothing: they need none of these (see `Context.bot_permissions`)."""
    in_channel = commands.bot_has_permissions(**permissions_for(task)).predicate  # type: ignore[attr-defined]

    async def predicate(ctx: commands.Context[Any]) -> bool:
        return ctx.interaction is not None or await in_channel(ctx)

    return commands.check(predicate)


class HeavyCommandCooldown:
    """A cooldown per user and command, shared by the prefix, slash and context-menu forms of
    the command (discord.py's own cooldowns would give each form a bucket of its own).  Its
    length is the server's (`/config cooldown`): one mapping per length, so that a change
    applies from the next command."""

    def __init__(self) -> None:
        self._mappings: dict[float, commands.CooldownMapping[tuple[int, str]]] = {}

    def _bucket(self, user: discord.abc.User, task: str, seconds: float) -> commands.Cooldown | None:
        if seconds <= 0:
            return None
        if seconds not in self._mappings:
            self._mappings[seconds] = commands.CooldownMapping.from_cooldown(1, seconds, lambda key: key)
        return self._mappings[seconds].get_bucket((user.id, task))

    def hit(self, user: discord.abc.User, task: str, seconds: float) -> None:
        """Count a use; raises `CommandOnCooldown` while the user is still cooling down."""
        bucket = self._bucket(user, task, seconds)
        retry_after = bucket.update_rate_limit() if bucket is not None else None
        if bucket is not None and retry_after:
            raise commands.CommandOnCooldown(bucket, retry_after, commands.BucketType.user)

    def forgive(self, user: discord.abc.User, task: str, seconds: float) -> None:
        """Undo the last use: nothing ran (everything was refused), so nothing to cool down from."""
        if (bucket := self._bucket(user, task, seconds)) is not None:
            bucket.reset()


@dataclass
class _Job:
    source: ImageSource
    #: Where the image is found again (a chain button's Zebra-fy); None: in no message.
    origin: ImageRef | None = None
    ticket: Ticket | None = None
    error: Exception | None = None
    #: Requests ahead of this one when it was submitted.
    ahead: int = 0
    placeholder: discord.Message | None = None
    #: Listed in the bot's waiting requests while its placeholder shows Cancel.
    waiting: Waiting | None = None

    @property
    def cancelled(self) -> bool:
        """Cancelled by a press of Cancel: the placeholder already says so."""
        return self.waiting is not None and self.waiting.cancelled


@dataclass(frozen=True)
class _Answer:
    """One image's answer: what goes into the reply (or into the placeholder, edited)."""

    content: str | None = None
    embed: discord.Embed | None = None
    #: The zebra image to attach.  Kept encoded, not as a `discord.File` (which a send reads
    #: and closes), so that it can be sent again when a first try failed.
    upload: formatting.EncodedImage | None = None
    spoiler: bool = False
    #: No link previews (a spoilered link must not be previewed in clear).
    suppress_embeds: bool = False

    def file(self) -> discord.File | None:
        if self.upload is None:
            return None
        return formatting.image_file(self.upload, stem="zebra", spoiler=self.spoiler)


def usage(task: str, prefix: str, *, prefix_commands: bool = True) -> str:
    """How to give a command its image; without the message-content intent the bot cannot read
    `!commands`, so they are not offered."""
    menu = menu_name(TASK_SPECS[task])
    if not prefix_commands:
        return (
            f"I need an image for that. Use `/{task}` with a photo attached or its link, "
            f"or Apps → **{menu}** on a message that has one."
        )
    return (
        f"I need an image for that. Attach a photo to `{prefix}{task}`, put an image link after it, "
        f"or reply to a message that has one — or use `/{task}`, or Apps → **{menu}** on a message."
    )


def task_command(spec: TaskSpec) -> commands.HybridCommand:
    """The hybrid command (`!name` and `/name`) of one task of `inference.tasks`."""

    async def command(
        self: VisionCog, ctx: VisionContext, image: discord.Attachment | None = None, *, url: str | None = None
    ) -> None:
        await self.answer(ctx, spec.name, await ctx.images(image, url))

    # Named as a method of the cog: discord.py tells a method (whose first parameter is
    # `self`) from a function by its qualified name.
    command.__name__, command.__qualname__ = spec.name, f"VisionCog.{spec.name}"
    checked = answer_permissions(spec.name)(command)
    described = app_commands.describe(image="The photo", url="Or: a link to the photo")(checked)
    return commands.hybrid_command(name=spec.name, description=spec.description)(described)


class VisionCog(commands.Cog, name="Vision"):
    # One hybrid command per task: adding a task to `inference.tasks` adds its command.  (The
    # class body is where `commands.Cog` collects its commands, hence the namespace update.)
    locals().update({f"{name}_command": task_command(spec) for name, spec in TASK_SPECS.items()})

    def __init__(self, bot: VisionBot) -> None:
        self.bot = bot
        self.heavy_cooldown = HeavyCommandCooldown()
        # Context menus cannot be declared in a cog with a decorator; they are built here, one
        # per task, and added to the tree when the cog loads.
        self.menus = [self._menu(spec) for spec in TASK_SPECS.values()]

    async def cog_load(self) -> None:
        for menu in self.menus:
            self.bot.tree.add_command(menu)

    async def cog_unload(self) -> None:
        for menu in self.menus:
            self.bot.tree.remove_command(menu.name, type=menu.type)

    def _menu(self, spec: TaskSpec) -> app_commands.ContextMenu:
        async def menu(interaction: discord.Interaction, message: discord.Message) -> None:
            await self._answer_menu(interaction, message, spec.name)

        # No permission check: a context menu answers through its interaction (see
        # `answer_permissions`); the gate is the tree's `interaction_check`.
        return app_commands.ContextMenu(name=menu_name(spec), callback=menu)

    async def _answer_menu(self, interaction: discord.Interaction, message: discord.Message, task: str) -> None:
        # The interaction carries the whole target message, content included: this works
        # without the message-content intent.  (The channel gate ran in the tree.)
        if needs_fetch(message):
            # Asking Discord for the replied-to message can take longer than the 3 s an
            # interaction has to be acknowledged: acknowledge first.
            await interaction.response.defer(thinking=True)
        sources = await find_sources(message)
        if not sources:
            raise NoImageFound("That message has no image I can use (no attachment, image embed or link).")
        ctx = await self.bot.get_context(interaction)
        await self.answer(ctx, task, sources, origin=ImageRef.of(message))

    # --- the work ---------------------------------------------------------------------------------
    async def answer(
        self, ctx: VisionContext, task: str, sources: list[ImageSource], *, origin: ImageRef | None = None
    ) -> None:
        """Answer each of `sources`; `origin`: where the first of them is found again (by
        default a prefix command's own message; a slash command's images are in none)."""
        if not sources:
            raise NoImageFound(usage(task, self.bot.settings.command_prefix, prefix_commands=ctx.prefix_commands))
        server = self.bot.server_settings(ctx.guild)  # its `/config` over the bot's settings
        limit, cooldown_s = server.max_images_per_message, server.heavy_command_cooldown_s
        sources, skipped = sources[:limit], sources[limit:]
        user = ctx.invoker
        heavy = TASK_SPECS[task].heavy
        if heavy:
            self.heavy_cooldown.hit(user, task, cooldown_s)

        async with self.bot.request(), AsyncExitStack() as typing:
            await typing.enter_async_context(ctx.typing())
            # `on_vision_request(ctx, task)`: a request is in flight (for listeners and tests).
            self.bot.dispatch("vision_request", ctx, task)
            if origin is None and ctx.interaction is None:
                origin = ImageRef.of(ctx.message)
            jobs = [_Job(source, origin.nth(i) if origin else None) for i, source in enumerate(sources)]
            try:
                await self._submit(task, jobs, user, ctx.request_options(task))
                if not any(job.ticket is not None for job in jobs) and heavy:
                    self.heavy_cooldown.forgive(user, task, cooldown_s)  # nothing ran: no reason to wait
                if skipped:
                    names = [formatting.source_text(s.label, spoiler=s.spoiler, link=s.url is not None) for s in skipped]
                    await self._say(ctx, f"⚠️ {formatting.skipped_message(names, limit)}")
                if any(job.ahead > 0 for job in jobs):
                    # Someone is ahead: every image gets its reply now, in order, showing its
                    # place in line and a Cancel button; each is edited into its result below.
                    for job in jobs:
                        if job.ticket is not None:
                            view = cancel_view(user.id)
                            text = formatting.queue_message(job.ahead, job.ticket.estimated_wait())
                            job.placeholder = await self._say(ctx, text, view=view)
                            if job.placeholder is not None:  # kept up to date while it waits
                                job.waiting = self.bot.waiting.add(job.placeholder, job.ticket, text)
                    # The replies say what is going on: no typing indicator on top (one call
                    # every 5 s for as long as the line takes).
                    await typing.aclose()
                for job in jobs:
                    try:
                        await self._answer_job(ctx, task, job)
                    except discord.HTTPException as error:
                        # This image's answer could not be sent (a permission, a message gone):
                        # say so for this one, and go on with the next.
                        await report_error(ctx, error, placeholder=job.placeholder, spoiler=job.source.spoiler)
            finally:
                for job in jobs:  # the caller is gone (error, cancellation): free the queue
                    if job.ticket is not None and not job.ticket.done():
                        job.ticket.cancel()
                    if job.waiting is not None:
                        self.bot.waiting.remove(job.waiting)  # a late Cancel: "no longer waiting"

    async def _say(self, ctx: VisionContext, text: str, **kwargs: Any) -> discord.Message | None:
        """A line of the bot's own (a place in line, skipped images); one that cannot be sent is
        logged and does not stop the answers."""
        try:
            return await ctx.reply_safely(text, **kwargs)
        except discord.HTTPException as error:
            log.warning("could not send a line in channel %s: %s", getattr(ctx.channel, "id", None), error)
            return None

    async def _submit(self, task: str, jobs: list[_Job], user: discord.abc.User, options: dict[str, Any]) -> None:
        """Ask for slots first, then download and submit only the images that got one."""
        try:
            reservation = self.bot.service.reserve(task, len(jobs), user=user.id)
        except InferenceError as error:  # Busy (with its retry hint), ServiceClosed…
            for job in jobs:
                job.error = error
            return
        async with reservation:  # frees the slots not used, whatever happens below
            for index, job in enumerate(jobs):
                if index >= reservation.granted:
                    job.error = reservation.shortfall  # the service's Busy, with its retry hint
                    continue
                try:
                    async with self.bot.downloads.hold(job.source.download_size(self.bot.fetcher)):
                        data = await job.source.read(self.bot.fetcher)
                    # Only the model, when not the configured one: the service completes the
                    # options from `inference.tasks` (top 5…).
                    job.ticket = reservation.submit(data, **options)
                except (ImageFetchError, InferenceError) as error:
                    job.error = error
                    continue
                job.ahead = job.ticket.position()

    async def _answer_job(self, ctx: VisionContext, task: str, job: _Job) -> None:
        spoiler = job.source.spoiler
        if job.error is not None:
            await report_error(ctx, job.error, placeholder=job.placeholder, spoiler=spoiler)
            return
        assert job.ticket is not None
        try:
            result = await result_or_restart(self.bot, job.ticket)
        except InferenceError as error:
            if job.waiting is not None:
                await self.bot.waiting.finish(job.waiting)  # no update of its place after this
            if job.cancelled:
                return  # the Cancel press has edited the placeholder already
            await report_error(ctx, error, placeholder=job.placeholder, spoiler=spoiler)
            return
        if job.waiting is not None:
            await self.bot.waiting.finish(job.waiting)  # no update of its place after this
        answer = await self._render(ctx, task, job.source, result)
        buttons = answer_view(ctx.invoker.id, chain_buttons(task, job.origin))
        if job.placeholder is not None:
            # A message of the channel can also be told not to preview links; a followup of an
            # interaction cannot (its links are inside `<>`, which Discord does not preview).
            channel_message = not isinstance(job.placeholder, (discord.WebhookMessage, discord.InteractionMessage))
            extra = {"suppress": answer.suppress_embeds} if channel_message else {}
            try:
                await job.placeholder.edit(
                    content=answer.content,
                    embed=answer.embed,
                    attachments=[file] if (file := answer.file()) else [],
                    view=buttons,
                    **extra,
                )
                return
            except discord.NotFound:
                # Deleted meanwhile (by a moderator): the answer comes as a new reply.
                log.debug("placeholder %s is gone; answering in a new message", job.placeholder.id)
                job.placeholder = None
        await ctx.reply_safely(
            answer.content,
            embed=answer.embed,
            file=answer.file(),
            suppress_embeds=answer.suppress_embeds,
            view=buttons,
        )

    async def _render(self, ctx: VisionContext, task: str, source: ImageSource, result: Any) -> _Answer:
        label, spoiler, link = source.label, source.spoiler, source.url is not None
        if task == "classify":
            model = ctx.model_for("classify")
            embed = formatting.classification_embed(result, source=label, model=model, spoiler=spoiler)
            return _Answer(embed=embed)
        if task == "caption":
            content = formatting.caption_message(result, source=label, spoiler=spoiler, link=link)
            return _Answer(content=content, suppress_embeds=spoiler)
        if task == "zebra":
            limit = formatting.upload_limit(ctx.guild, ctx.interaction)
            # Re-encoding a large image is CPU work: not on the event loop.
            encoded = await asyncio.to_thread(formatting.fit_upload, result, limit)
            content = formatting.zebra_message(label, spoiler=spoiler, link=link)
            if ctx.requested_model is not None:  # `/style NAME`
                content = f"🎨 {formatting.source_text(label, spoiler=spoiler, link=link)}, as `{ctx.requested_model}`"
            return _Answer(content=content, upload=encoded, spoiler=spoiler, suppress_embeds=spoiler)
        raise ValueError(f"unknown task {task!r}")


async def setup(bot: VisionBot) -> None:
    await bot.add_cog(VisionCog(bot))
