"""Where a command's image comes from, and getting its bytes.

Order (issue 4): the message's own attachments → image links in it → the message it replies to
(its attachments, embed images, links).  Nothing here decides whether bytes *are* an image:
the decoder in the inference worker does that, for attachments and links alike.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import discord

from bot.urls import ImageFetcher, ImageFetchError

log = logging.getLogger(__name__)

#: http(s) links up to whitespace, `<`/`>` (Discord's "no preview" brackets) or `|` (spoilers).
_URL = re.compile(r"https?://[^\s<>|]+", re.IGNORECASE)
_SPOILER = re.compile(r"\|\|(.+?)\|\|", re.DOTALL)
_TRAILING_PUNCTUATION = ".,;:!?'\"*_~`"


@dataclass(frozen=True)
class ImageSource:
    """One image to answer: an attachment or a link, and whether it was marked as a spoiler."""

    #: What the answer calls it: the file name, or the link.
    label: str
    spoiler: bool = False
    attachment: discord.Attachment | None = None
    url: str | None = None

    def download_size(self, fetcher: ImageFetcher) -> int:
        """The most bytes reading this source can take: an attachment declares its size; a
        link is known only once read, so it counts as the fetcher's per-image limit."""
        if self.attachment is not None:
            return min(self.attachment.size, fetcher.max_bytes)
        return fetcher.max_bytes

    async def read(self, fetcher: ImageFetcher) -> bytes:
        if self.attachment is not None:
            if self.attachment.size > fetcher.max_bytes:
                limit_mb = fetcher.max_bytes / (1024 * 1024)
                raise ImageFetchError(f"{self.label} is larger than the {limit_mb:.0f} MB I accept.")
            try:
                return await self.attachment.read()
            except discord.HTTPException as error:
                log.warning(
                    "could not download attachment %s from Discord: %s %s",
                    self.attachment.id, error.status, error.text or "",
                )
                raise ImageFetchError(f"I could not download {self.label} from Discord.") from None
        assert self.url is not None
        return await fetcher.fetch(self.url)


def _attachment_source(attachment: discord.Attachment) -> ImageSource:
    # Discord marks a spoiler by the SPOILER_ file-name prefix; answers show the plain name.
    label = attachment.filename.removeprefix("SPOILER_") or attachment.filename
    return ImageSource(label=label, spoiler=attachment.is_spoiler(), attachment=attachment)


def links_in(text: str) -> list[tuple[str, bool]]:
    """(url, is_spoiler) for every http(s) link in `text`, in order, without duplicates."""
    spoiler_spans = [match.span(1) for match in _SPOILER.finditer(text)]
    found: dict[str, bool] = {}
    for match in _URL.finditer(text):
        url = _trim(match.group(0))
        spoiler = any(start <= match.start() < end for start, end in spoiler_spans)
        found.setdefault(url, spoiler)
    return list(found.items())


def _trim(url: str) -> str:
    url = url.rstrip(_TRAILING_PUNCTUATION)
    # "(see https://x/y.png)": the closing parenthesis is prose, unless the URL opened one.
    while url.endswith(")") and url.count("(") < url.count(")"):
        url = url[:-1].rstrip(_TRAILING_PUNCTUATION)
    return url


def sources_in_message(message: discord.Message) -> list[ImageSource]:
    """A message's own images: its attachments, else its embed images and links."""
    attachments = [_attachment_source(attachment) for attachment in message.attachments]
    if attachments:
        return attachments
    written = links_in(message.content or "")
    spoilered = {url for url, spoiler in written if spoiler}
    plain = {url for url, spoiler in written if not spoiler}
    links: dict[str, ImageSource] = {}
    for embed in message.embeds:
        # Rich embeds carry `image`; Discord's own previews of image links carry `thumbnail`.
        url = embed.image.url or (embed.thumbnail.url if embed.type in ("image", "gifv") else None)
        if url:
            # A preview repeats a link the user wrote, behind a spoiler or not; one that matches
            # no link in the text is a spoiler when anything in the message is (never leak).
            names = {url, embed.url}
            hidden = _SPOILER.search(message.content or "") is not None
            spoiler = bool(names & spoilered) or (hidden and not names & plain)
            links.setdefault(url, ImageSource(label=url, spoiler=spoiler, url=url))
    for url, spoiler in written:
        # The link itself is what the user wrote; its preview embed repeats it.
        links.setdefault(url, ImageSource(label=url, spoiler=spoiler, url=url))
    return list(links.values())


async def find_sources(message: discord.Message, *, limit: int | None = None) -> list[ImageSource]:
    """The images a prefix command (or context-menu target) refers to (the first `limit`)."""
    sources = sources_in_message(message)
    if not sources:
        replied = await replied_message(message)
        if replied is not None:
            sources = sources_in_message(replied)
    return sources if limit is None else sources[:limit]


def needs_fetch(message: discord.Message) -> bool:
    """Whether `find_sources(message)` would ask Discord for the replied-to message."""
    if sources_in_message(message):
        return False
    reference = message.reference
    return (
        reference is not None
        and reference.message_id is not None
        and reference.resolved is None
        and reference.channel_id == message.channel.id
    )


async def replied_message(message: discord.Message) -> discord.Message | None:
    reference = message.reference
    if reference is None or reference.message_id is None:
        return None
    if isinstance(reference.resolved, discord.Message):
        return reference.resolved
    if isinstance(reference.resolved, discord.DeletedReferencedMessage):
        return None
    # Not in the gateway payload (too old or not cached): ask for it.
    if reference.channel_id != message.channel.id:
        return None
    try:
        return await message.channel.fetch_message(reference.message_id)
    except discord.NotFound:
        log.debug("replied-to message %s is gone", reference.message_id)
        return None  # deleted meanwhile: as if it never had an image
    except discord.HTTPException as error:
        log.warning(
            "could not fetch replied-to message %s in channel %s: %s %s",
            reference.message_id, message.channel.id, error.status, error.text or "",
        )
        return None


def sources_from_options(
    attachment: discord.Attachment | None, link: str | None, *, limit: int | None = None
) -> list[ImageSource]:
    """The images a slash command was given: its `image` attachment and `url` text."""
    sources: list[ImageSource] = []
    if attachment is not None:
        sources.append(_attachment_source(attachment))
    if link and link.strip():
        links = links_in(link) or [(link.strip(), False)]  # the fetcher says what is wrong with it
        sources.extend(ImageSource(label=url, spoiler=spoiler, url=url) for url, spoiler in links)
    return sources if limit is None else sources[:limit]
