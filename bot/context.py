"""`VisionContext`: the `commands.Context` every command of the bot gets (RoboDanny's
`cogs/utils/context.py` idea), carrying what each command needs so that commands stay short.

The bot builds it for prefix and hybrid commands (`VisionBot.get_context`) and for the context
menus (`get_context(interaction)`), so one set of helpers serves all three forms.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import discord
from discord.ext import commands

from bot.errors import report_error
from bot.replies import reply
from bot.sources import ImageSource, find_sources, sources_from_options
from inference.tasks import MODEL_OPTION, TASK_SPECS

if TYPE_CHECKING:
    from bot.client import VisionBot


class VisionContext(commands.Context["VisionBot"]):
    #: The model the command asked for (`/style NAME`); None: the server's or the bot's own.
    requested_model: str | None = None

    def model_for(self, task: str) -> str:
        """The model this command's request runs: the one asked for, else the server's
        classifier (`/config`) for classify, else the configured one."""
        if self.requested_model is not None:
            return self.requested_model
        if task == "classify":
            return self.bot.server_settings(self.guild).classifier
        return TASK_SPECS[task].default_model(self.bot.settings)

    def request_options(self, task: str) -> dict[str, Any]:
        """The request's `model` option, when it is not the service's configured model."""
        model = self.model_for(task)
        return {MODEL_OPTION: model} if model != TASK_SPECS[task].default_model(self.bot.settings) else {}

    @property
    def invoker(self) -> discord.abc.User:
        """Who asked.  In a context menu `author` is the author of the *target* message."""
        return self.interaction.user if self.interaction is not None else self.author

    @property
    def prefix_commands(self) -> bool:
        """Whether the bot can read `!commands` (the message-content intent): help and usage
        lines offer them only then."""
        return self.bot.intents.message_content

    async def images(
        self, image: discord.Attachment | None = None, url: str | None = None
    ) -> list[ImageSource]:
        """The images a command works on: for a message, all its attachments (the `image`
        argument is the first of them), its links, else the message it replies to; for a slash
        command, its options."""
        if self.interaction is None:
            return await find_sources(self.message)
        return sources_from_options(image, url)

    async def reply_safely(self, content: str | None = None, **kwargs: Any) -> discord.Message:
        """A reply that never pings and survives its command message being deleted meanwhile
        (`fail_if_not_exists=False`); see `bot.replies`."""
        return await reply(self, content, **kwargs)

    async def send_error(self, error: BaseException, **kwargs: Any) -> None:
        """Tell the user about `error` the bot's one way (`bot.errors.report_error`): ephemeral
        in an interaction, a reply otherwise, logged when it is internal."""
        await report_error(self, error, **kwargs)
