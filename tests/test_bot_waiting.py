"""Live "you're in line" replies (issue 8): the place in line and the estimated wait, updated as
the line moves, coalesced (one edit per message per tick, none when the text is the same), and
what a waiting request costs in Discord API calls.

A slow fake backend (`FakeLine`: one waiting line the test moves) stands in for the models, and
simcord's virtual clock for time: the bot's ticker (`discord.ext.tasks`) ticks only when the test
moves the clock (`env.advance_time`), and a request waits (`env.external_wait`) until the test
finishes it, so every count below is exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Generator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import discord
import pytest
import simcord
from simcord.results import InteractionResult

from bot import create_bot
from bot.buttons import CANCELLED
from bot.waiting import REFRESH_INTERVAL_S
from config import Settings
from inference.pipeline import Prediction
from inference.service import InferenceService, ModelState, ServiceStats
from inference.tasks import TASKS
from tests.test_bot import bot_messages, world
from tests.test_bot_buttons import button_id, press

pytestmark = pytest.mark.asyncio(loop_scope="module")

PREDICTIONS = [Prediction("golden retriever", 91.0), Prediction("Labrador retriever", 5.0)]
#: Short: a request held by the test is a recognised wait, and the typing indicator's 5 s sleep
#: must count as "beyond the settling deadline".
SETTLE_S = 3.0


@dataclass(eq=False)
class FakeTicket:
    line: FakeLine
    task: str
    user: Hashable | None
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def position(self) -> int:
        return self.line.queue.index(self) if self in self.line.queue else 0

    def estimated_wait(self) -> float | None:
        return 0.0 if self.done() else self.line.seconds_per_request * (self.position() + 1)

    def done(self) -> bool:
        return self.future.done()

    def cancel(self) -> None:
        self.future.cancel()
        self.line.drop(self)

    def __await__(self) -> Generator[Any, None, Any]:
        assert self.line.env is not None
        return (yield from self.line.env.external_wait(self.future, reason="the fake model").__await__())


@dataclass(eq=False)
class FakeReservation:
    line: FakeLine
    task: str
    user: Hashable | None
    granted: int
    shortfall: None = None
    used: int = 0

    @property
    def remaining(self) -> int:
        return self.granted - self.used

    def submit(self, image: bytes, *, timeout: float | None = None, **options: Any) -> FakeTicket:
        self.used += 1
        return self.line.enqueue(self.task, self.user)

    def release(self) -> None:
        self.used = self.granted

    async def __aenter__(self) -> FakeReservation:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def __enter__(self) -> FakeReservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class FakeLine:
    """An `InferenceBackend` with one first-come line that moves when the test says (`finish`)."""

    def __init__(self, seconds_per_request: float) -> None:
        self.seconds_per_request = seconds_per_request
        self.queue: list[FakeTicket] = []
        self.env: simcord.Env | None = None
        self.cancelled = 0

    def enqueue(self, task: str, user: Hashable | None) -> FakeTicket:
        ticket = FakeTicket(self, task, user)
        self.queue.append(ticket)
        return ticket

    def others_ahead(self, count: int) -> list[FakeTicket]:
        return [self.enqueue("classify", None) for _ in range(count)]

    def finish(self, count: int = 1) -> None:
        for ticket in self.queue[:count]:
            ticket.future.set_result(PREDICTIONS)
        del self.queue[:count]

    def drop(self, ticket: FakeTicket) -> None:
        if ticket in self.queue:
            self.queue.remove(ticket)
            self.cancelled += 1

    # -- the rest of `InferenceBackend` ------------------------------------------------------
    async def start(self) -> None: ...

    async def close(self, *, grace_s: float = 5.0) -> None: ...

    async def __aenter__(self) -> FakeLine:
        return self

    async def __aexit__(self, *exc_info: object) -> None: ...

    async def warm_up(self, *tasks: str) -> list[ModelState]:
        return self.models()

    def submit(self, task: str, image: bytes, *, user: Hashable | None = None, **options: Any) -> FakeTicket:
        return self.enqueue(task, user)

    def reserve(self, task: str, count: int, *, user: Hashable | None = None) -> FakeReservation:
        return FakeReservation(self, task, user, count)

    def models(self) -> list[ModelState]:
        return [ModelState(task, "fake", "ready") for task in TASKS]

    def stats(self) -> ServiceStats:
        return ServiceStats({})

    def pending_for(self, user: Hashable) -> int:
        return sum(ticket.user == user for ticket in self.queue)


@asynccontextmanager
async def bot_on(line: FakeLine, tmp_path) -> AsyncIterator[simcord.Env]:
    settings = Settings(heavy_command_cooldown_s=0, bot_data_dir=tmp_path, database_path=tmp_path / "bot.sqlite3")
    bot = create_bot(settings, service=line)  # type: ignore[arg-type]  # the fake is a backend
    try:
        async with simcord.run(bot, settle_timeout=SETTLE_S) as env:
            line.env = env
            yield env
    finally:
        await bot.close()


def edits_of(env: simcord.Env, message: discord.Message) -> list[str]:
    """The contents the bot's edits of `message` set, in order (simcord's record of API calls)."""
    return [
        (r.json or {}).get("content") or ""
        for r in env.http_requests
        if r.method == "PATCH" and r.path.endswith(f"/messages/{message.id}")
    ]


def posts(env: simcord.Env) -> int:
    return sum(r.method == "POST" and r.path.endswith("/messages") for r in env.http_requests)


async def test_the_reply_follows_the_line_and_is_edited_only_when_its_text_changes(tmp_path, bobby_jpg):
    line = FakeLine(seconds_per_request=4.0)
    async with bot_on(line, tmp_path) as env:
        channel, alice = world(env)
        line.others_ahead(3)
        await alice.send(channel, "!classify", attachments=[("bobby.jpg", bobby_jpg)])
        (reply,) = bot_messages(channel, env)
        assert reply.content.startswith("⏳ You're in line: 3 requests ahead of yours, about 20 s to wait.")
        assert [row.children[0].label for row in reply.components] == ["Cancel"]

        await env.advance_time(REFRESH_INTERVAL_S)  # nothing moved: no edit
        assert edits_of(env, reply) == []

        line.finish(1)
        await env.advance_time(REFRESH_INTERVAL_S)
        assert edits_of(env, reply)[-1].startswith("⏳ You're in line: 2 requests ahead of yours, about 15 s")

        line.finish(2)  # two at once, between two ticks: one edit
        await env.advance_time(REFRESH_INTERVAL_S)
        await env.advance_time(REFRESH_INTERVAL_S)
        assert len(edits_of(env, reply)) == 2
        assert edits_of(env, reply)[-1].startswith("⏳ You're in line: yours is next, about 4 s to wait.")
        assert channel.last_message.components  # Cancel still there while it waits

        line.finish(1)  # alice's own: the reply becomes the answer
        await env.settle()
        (answer,) = bot_messages(channel, env)
        assert answer.embeds and "golden retriever" in answer.embeds[0].fields[0].value
        assert len(edits_of(env, reply)) == 3 and posts(env) == 1
        assert len(env.bot.waiting) == 0
        await env.advance_time(3 * REFRESH_INTERVAL_S)  # the ticker has stopped: nothing more
        assert len(edits_of(env, reply)) == 3 and env.errors == []


async def test_a_reply_is_never_edited_within_2_s_of_its_last_change(tmp_path, bobby_jpg):
    line = FakeLine(seconds_per_request=1.0)
    async with bot_on(line, tmp_path) as env:
        channel, alice = world(env)
        bob = env.guild.add_member(env.create_user("bob"))
        line.others_ahead(3)
        await alice.send(channel, "!classify", attachments=[("bobby.jpg", bobby_jpg)])  # the ticker starts
        await env.advance_time(REFRESH_INTERVAL_S * 0.75)
        await bob.send(channel, "!classify", attachments=[("bobby.jpg", bobby_jpg)])  # just before a tick
        alices, bobs = bot_messages(channel, env)
        line.finish(1)
        await env.advance_time(REFRESH_INTERVAL_S * 0.25)  # the tick: alice's reply moves, bob's waits
        assert len(edits_of(env, alices)) == 1 and edits_of(env, bobs) == []
        await env.advance_time(REFRESH_INTERVAL_S)  # the next one
        assert "3 requests ahead" in edits_of(env, bobs)[-1] and len(edits_of(env, alices)) == 1
        line.finish(5)
        await env.settle()
        assert env.errors == []


async def test_a_tick_edits_at_most_two_replies_of_a_channel(tmp_path, bobby_jpg):
    line = FakeLine(seconds_per_request=1.0)
    async with bot_on(line, tmp_path) as env:
        channel, alice = world(env)
        line.others_ahead(2)
        photos = [(f"{name}.jpg", bobby_jpg) for name in "abc"]
        await alice.send(channel, "!classify", attachments=photos)  # three replies in line
        replies = bot_messages(channel, env)
        line.finish(1)
        await env.advance_time(REFRESH_INTERVAL_S)
        assert sorted(len(edits_of(env, reply)) for reply in replies) == [0, 1, 1]
        await env.advance_time(REFRESH_INTERVAL_S)  # the one left over goes first now
        assert [len(edits_of(env, reply)) for reply in replies] == [1, 1, 1]
        line.finish(4)
        await env.settle()
        assert env.errors == []


async def test_cancel_still_works_and_the_ticker_leaves_a_cancelled_reply_alone(tmp_path, bobby_jpg):
    line = FakeLine(seconds_per_request=1.0)
    async with bot_on(line, tmp_path) as env:
        channel, alice = world(env)
        line.others_ahead(5)
        await alice.send(channel, "!classify", attachments=[("bobby.jpg", bobby_jpg)])
        (reply,) = bot_messages(channel, env)
        line.finish(1)
        await env.advance_time(REFRESH_INTERVAL_S)
        assert "4 requests ahead" in edits_of(env, reply)[-1]

        press = await alice.click(reply, label="Cancel")
        assert press.acknowledged and not press.ephemeral
        line.finish(2)
        await env.advance_time(3 * REFRESH_INTERVAL_S)
        await env.settle()
        (reply,) = bot_messages(channel, env)
        assert reply.content == "🚫 Cancelled before it reached the model." and reply.components == []
        assert line.cancelled == 1 and len(edits_of(env, reply)) == 1  # the one update; the press edited it
        assert len(env.bot.waiting) == 0 and env.errors == []


async def test_cancel_pressed_while_the_ticker_edits_the_reply_has_the_last_word(tmp_path, bobby_jpg):
    line = FakeLine(seconds_per_request=1.0)
    async with bot_on(line, tmp_path) as env:
        channel, alice = world(env)
        line.others_ahead(3)
        await alice.send(channel, "!classify", attachments=[("bobby.jpg", bobby_jpg)])
        (reply,) = bot_messages(channel, env)
        presses: list[InteractionResult] = []
        http_request = env.bot.http.request

        async def request(route: Any, **kwargs: Any) -> Any:
            if route.method == "PATCH" and not presses:  # the ticker's update, on its way
                presses.append(press(env, alice, reply, button_id(reply, "Cancel")))
                for _ in range(50):  # the press is handled while the update is in flight
                    await asyncio.sleep(0)
            return await http_request(route, **kwargs)

        env.bot.http.request = request  # type: ignore[method-assign]
        line.finish(1)
        await env.advance_time(REFRESH_INTERVAL_S)
        await env.settle()
        (reply,) = bot_messages(channel, env)
        assert reply.content == CANCELLED and reply.components == []  # not the update's text
        assert presses[0].acknowledged and not presses[0].ephemeral and line.cancelled == 1
        assert env.errors == []


async def api_calls_of_one_waiting_request(
    tmp_path, bobby_jpg, ahead: int, seconds_per_request: float
) -> dict[str, int]:
    """Alice's request behind `ahead` others, the line moving one request per
    `seconds_per_request`: the messages it posts and the edits of its reply."""
    line = FakeLine(seconds_per_request)
    async with bot_on(line, tmp_path) as env:
        channel, alice = world(env)
        line.others_ahead(ahead)
        await alice.send(channel, "!classify", attachments=[("bobby.jpg", bobby_jpg)])
        (reply,) = bot_messages(channel, env)
        for _ in range(ahead):
            await env.advance_time(seconds_per_request)
            line.finish(1)
        await env.advance_time(seconds_per_request)
        line.finish(1)  # alice's
        await env.settle()
        assert "golden retriever" in bot_messages(channel, env)[0].embeds[0].fields[0].value
        assert env.errors == []
        typing = sum(r.path.endswith("/typing") for r in env.http_requests)
        return {"posts": posts(env), "edits": len(edits_of(env, reply)), "typing": typing}


@pytest.mark.parametrize("ahead", [1, 10, 50])
async def test_what_one_waiting_request_costs_in_api_calls(tmp_path, bobby_jpg, ahead):
    # A model that takes 1 s a request: the text changes every second, the reply at most every 2 s.
    calls = await api_calls_of_one_waiting_request(tmp_path, bobby_jpg, ahead, seconds_per_request=1.0)
    print(f"\n{ahead} ahead: {calls}")
    wait_s = ahead + 1
    assert calls["posts"] == 1  # the "you're in line" reply, edited into the answer
    assert calls["typing"] == 1  # the typing indicator stops once that reply says it waits
    # The updates (at most one per tick while it waits) and the answer.
    assert 1 + ahead // 2 - 1 <= calls["edits"] <= wait_s / REFRESH_INTERVAL_S + 2


async def test_a_slash_commands_reply_is_kept_up_to_date_too(tmp_path, bobby_jpg):
    line = FakeLine(seconds_per_request=1.0)
    async with bot_on(line, tmp_path) as env:
        channel, alice = world(env)
        line.others_ahead(2)
        slash = await alice.slash(channel, "classify", image=("bobby.jpg", bobby_jpg))
        reply = slash.response.message  # the "thinking…" message, completed by the reply
        assert "2 requests ahead" in reply.content
        line.finish(1)
        await env.advance_time(REFRESH_INTERVAL_S)
        assert "1 request ahead of yours, about 2 s" in edits_of(env, reply)[-1]
        line.finish(2)
        await env.settle()
        assert slash.response.embeds[0].title == "What's in bobby.jpg?"
        assert env.errors == []


async def test_the_local_service_estimates_a_wait_once_it_has_measured_its_model(
    generated_weights_dir, bobby_jpg, tmp_path
):
    settings = Settings(weights_dir=generated_weights_dir, bot_data_dir=tmp_path, cpu_cores=1)
    async with InferenceService(settings) as service:
        first = service.submit("classify", bobby_jpg)
        assert first.estimated_wait() is None  # nothing measured yet
        await first
        assert first.estimated_wait() == 0.0
        # The worker reports a batch as over after its results: once a second request has its
        # result, the first batch's time is in (the pipe keeps the order).
        await service.submit("classify", bobby_jpg)
        tickets = [service.submit("classify", bobby_jpg) for _ in range(3)]
        estimates = [ticket.estimated_wait() for ticket in tickets]
        assert all(e is not None and e > 0 for e in estimates) and estimates == sorted(estimates)
        assert estimates[2] == pytest.approx(3 * estimates[0])  # three requests' worth: two ahead and itself
        await asyncio.gather(*tickets)
