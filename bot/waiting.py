"""Requests waiting in line behind a "you're in line" reply, kept up to date while they wait.

The reply shows the request's place in line and its estimated wait (`Ticket.position`,
`Ticket.estimated_wait`).  One bot-wide ticker (`discord.ext.tasks`, every `REFRESH_INTERVAL_S`)
edits the replies whose text changed: never a message whose text is the same, at most one edit
of a message per interval, and at most `EDITS_PER_CHANNEL` edits per channel per tick (the least
recently edited first), so a long line never runs into Discord's rate limits.  The ticker runs
only while something waits.

When its request is done, the command takes the reply back (`finish`: after any edit of the
ticker's in progress, none after) and edits it into the answer; a press of Cancel does the same
(`Waiting.cancelled`).  `result_or_restart` is how a command waits for its result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import discord
from discord.ext import tasks

from bot.errors import RESTARTING_MESSAGE
from bot.formatting import queue_message
from inference.errors import ServiceClosed
from inference.service import Ticket

if TYPE_CHECKING:
    from bot.client import VisionBot

log = logging.getLogger(__name__)

#: Seconds between two looks at the line, and the least time between two edits of one message.
REFRESH_INTERVAL_S = 2.0
#: Edits per channel per tick: Discord allows about five message edits per channel per 5 s.
EDITS_PER_CHANNEL = 2


@dataclass(eq=False)
class Waiting:
    """A request waiting in line behind its "you're in line" reply."""

    message: discord.Message
    ticket: Ticket
    #: The text the reply shows now.
    shown: str
    #: `time.monotonic()` of the reply's last change (its sending counts).  Looked up when
    #: called, like the ticker's own reading (a clock swapped in by a test world applies to both).
    changed_at: float = field(default_factory=lambda: time.monotonic())
    #: Set when a press of Cancel took it out of the line: the message says so already.
    cancelled: bool = False
    #: Held while the ticker edits the reply, so that no edit of its lands after the answer.
    editing: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def message_id(self) -> int:
        return self.message.id

    def text(self) -> str:
        return queue_message(self.ticket.position(), self.ticket.estimated_wait())


class WaitingRequests:
    """The bot's waiting requests, by the id of the reply that carries their Cancel button."""

    def __init__(self, interval_s: float = REFRESH_INTERVAL_S) -> None:
        self._by_message: dict[int, Waiting] = {}
        self.interval_s = interval_s
        self._ticker = tasks.loop(seconds=interval_s)(self._refresh)

    def add(self, message: discord.Message, ticket: Ticket, shown: str) -> Waiting:
        waiting = self._by_message[message.id] = Waiting(message, ticket, shown)
        if not self._ticker.is_running():
            self._ticker.start()
        return waiting

    def get(self, message_id: int) -> Waiting | None:
        return self._by_message.get(message_id)

    def remove(self, waiting: Waiting) -> None:
        if self._by_message.get(waiting.message_id) is waiting:
            del self._by_message[waiting.message_id]

    async def finish(self, waiting: Waiting) -> None:
        """Take the reply back from the ticker: returns once no edit of the ticker's can follow."""
        self.remove(waiting)
        async with waiting.editing:
            pass

    def stop(self) -> None:
        self._ticker.cancel()

    def __len__(self) -> int:
        return len(self._by_message)

    async def _refresh(self) -> None:
        """One tick: edit the replies whose place in line or estimate changed."""
        now = time.monotonic()
        edits: Counter[int] = Counter()
        for waiting in sorted(self._by_message.values(), key=lambda w: w.changed_at):
            channel_id = waiting.message.channel.id
            # Changed less than an interval ago (sent just before this tick; 0.9: a tick may
            # come a little early), or its channel's share of this tick is used: next tick.
            if edits[channel_id] >= EDITS_PER_CHANNEL or now - waiting.changed_at < self.interval_s * 0.9:
                continue
            if waiting.cancelled or waiting.ticket.done():
                continue  # its command edits it into the answer (or Cancel did)
            text = waiting.text()
            if text == waiting.shown:
                continue
            edits[channel_id] += 1
            await self._edit(waiting, text, now)
        if not self._by_message:
            self._ticker.stop()  # no await since the check: an `add` now starts a new one

    async def _edit(self, waiting: Waiting, text: str, now: float) -> None:
        async with waiting.editing:
            if self.get(waiting.message_id) is not waiting or waiting.cancelled:
                return  # answered or cancelled meanwhile
            try:
                await waiting.message.edit(content=text)
            except discord.NotFound:
                self.remove(waiting)  # deleted (by a moderator): its answer comes as a new reply
            except discord.HTTPException as error:
                log.warning("could not update a place in line (message %s): %s", waiting.message_id, error)
            else:
                waiting.shown, waiting.changed_at = text, now  # the tick's time: one edit per tick


async def result_or_restart(bot: VisionBot, ticket: Ticket) -> Any:
    """The ticket's result; `ServiceClosed` when the bot runs out of its shutdown grace first."""
    if bot.out_of_time.is_set():
        raise ServiceClosed(RESTARTING_MESSAGE)
    result = asyncio.ensure_future(_awaited(ticket))
    # `close()` dispatches "vision_out_of_time" as it sets `out_of_time`: waiting for an event
    # through `wait_for` is discord.py's own kind of wait (one a test harness can see).
    stopped = asyncio.ensure_future(bot.wait_for("vision_out_of_time"))
    try:
        await asyncio.wait((result, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not result.done():
            result.cancel()  # cancels the request too
    if not result.done() or result.cancelled():
        raise ServiceClosed(RESTARTING_MESSAGE)
    return result.result()


async def _awaited(ticket: Ticket) -> Any:
    return await ticket
