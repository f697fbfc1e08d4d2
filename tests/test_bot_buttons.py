"""The buttons of issue 8, through simcord: Cancel on a request waiting in line, Delete on every
answer (also after the bot restarts), pressed by the requester, a moderator or someone else."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import discord
import pytest
import simcord
from simcord import interactions as sim_interactions
from simcord.backend import serializers
from simcord.results import InteractionResult

from bot import create_bot
from tests.test_bot import SETTLE_TIMEOUT_S, bot_messages, running_bot, service, top_label, world  # noqa: F401

pytestmark = pytest.mark.asyncio(loop_scope="module")


def buttons(message: discord.Message) -> list[str]:
    return [child.label for row in message.components for child in row.children]  # type: ignore[attr-defined]


def moderator(env: simcord.Env) -> simcord.MemberActor:
    role = env.guild.create_role("mods", permissions=discord.Permissions(manage_messages=True))
    return env.guild.add_member(env.create_user("mod"), roles=[role])


# --- Cancel -----------------------------------------------------------------------------------


class HeldModel:
    """The task's worker process stopped (SIGSTOP): whatever it holds stays there, and the
    requests behind it wait in line, until `resume()` (SIGCONT; also on leaving `with`)."""

    def __init__(self, service, task: str) -> None:
        self.pid = service.stats()[task].worker_pid
        assert self.pid is not None
        self.held = False

    def __enter__(self) -> HeldModel:
        os.kill(self.pid, signal.SIGSTOP)
        self.held = True
        return self

    def resume(self) -> None:
        if self.held:
            self.held = False
            os.kill(self.pid, signal.SIGCONT)

    def __exit__(self, *exc_info: object) -> None:
        self.resume()


async def on_the_model(service, task: str, image: bytes) -> Any:
    """A request of someone else's, once it is in the (held) worker: the next one waits."""
    sent = service.stats()[task].dispatched
    ticket = service.submit(task, image)
    for _ in range(500):
        if service.stats()[task].dispatched > sent:
            return ticket
        await asyncio.sleep(0.01)
    raise AssertionError("the request never reached the worker")


def button_id(message: discord.Message, label: str) -> str:
    (custom_id,) = [c.custom_id for row in message.components for c in row.children if c.label == label]  # type: ignore[attr-defined]
    return custom_id


def press(env: simcord.Env, actor: simcord.MemberActor, message: discord.Message, custom_id: str) -> InteractionResult:
    """`actor` presses the button `custom_id` of `message` *now*, while the bot is busy with a
    command (an actor's `click` waits for the bot to settle, which a request held in line never
    does): the same INTERACTION_CREATE that `click` sends, without the wait.  The bot handles it
    within the settling of the command in progress (or of the next `env.settle()`)."""
    backend = env.backend
    stored = backend.get_message(message.channel.id, message.id)
    # The button as the user's client shows it: one that has not caught up may show one that is gone.
    data = {"custom_id": custom_id, "component_type": discord.ComponentType.button.value}
    record, payload = sim_interactions.base_payload(
        backend,
        type=discord.InteractionType.component.value,
        channel_id=message.channel.id,
        guild_id=env.guild.id,
        user_id=actor.id,
        data=data,
    )
    payload["message"] = dict(serializers.message_payload(backend, stored))
    record.source_message_id = stored.id
    backend.emit("INTERACTION_CREATE", payload)
    return InteractionResult(env, record)


def when_in_line(env: simcord.Env, action: Any) -> None:
    """Run `action(placeholder)` (in a task of the bot's) once the bot posts a "you're in line" message."""
    seen: list[int] = []

    async def on_message(message: discord.Message) -> None:
        if message.author.id == env.bot.user.id and "in line" in message.content and not seen:
            seen.append(message.id)
            await action(message)

    env.bot.add_listener(on_message)


async def test_cancel_by_the_requester_takes_the_request_out_before_the_model(service, bobby_jpg):
    async with running_bot(service) as env:
        channel, alice = world(env)
        before = service.stats()["classify"]
        presses: list[InteractionResult] = []

        async def alice_cancels(placeholder: discord.Message) -> None:
            assert buttons(placeholder) == ["Cancel"]
            cancel = button_id(placeholder, "Cancel")
            # Pressed twice in a row, before the first press is handled: one cancels the
            # request, the other is told privately that it is over.
            presses.append(press(env, alice, placeholder, cancel))
            presses.append(press(env, alice, placeholder, cancel))

        when_in_line(env, alice_cancels)
        with HeldModel(service, "classify"):
            ahead = await on_the_model(service, "classify", bobby_jpg)  # someone else's
            await alice.send(channel, "!classify", attachments=[("bobby.jpg", bobby_jpg)])
            (placeholder,) = bot_messages(channel, env)
            assert placeholder.content == "🚫 Cancelled before it reached the model."
            assert placeholder.components == [] and not placeholder.embeds
            first, second = presses
            assert first.acknowledged and not first.ephemeral  # the press's response edited it
            assert second.ephemeral and second.response.content == "That request is no longer waiting."
        await ahead  # the one ahead still gets its answer
        after = service.stats()["classify"]
        assert after.cancelled == before.cancelled + 1
        assert after.ran == before.ran + 1  # only the one ahead went through the model
        assert len(env.bot.waiting) == 0 and service.pending_for(alice.id) == 0

        assert env.errors == []


async def test_cancel_by_someone_else_is_refused_and_the_request_answered(service, bobby_jpg):
    async with running_bot(service) as env:
        channel, alice = world(env)
        bob = env.guild.add_member(env.create_user("bob"))
        presses: list[InteractionResult] = []
        held = HeldModel(service, "classify")

        async def bob_presses(placeholder: discord.Message) -> None:
            presses.append(press(env, bob, placeholder, button_id(placeholder, "Cancel")))
            for _ in range(10_000):  # loop turns only: a timer here would be simcord's virtual time
                if presses[0].acknowledged:
                    break
                await asyncio.sleep(0)
            held.resume()  # the model goes on: the request is answered

        when_in_line(env, bob_presses)
        with held:
            ahead = await on_the_model(service, "classify", bobby_jpg)
            await alice.send(channel, "!classify", attachments=[("bobby.jpg", bobby_jpg)])
        await ahead
        (refusal,) = presses
        assert refusal.ephemeral and "isn't your request" in refusal.response.content
        (answer,) = bot_messages(channel, env)
        assert top_label(answer.embeds[0]) == "golden retriever" and "in line" not in answer.content
        assert buttons(answer) == ["Zebra-fy", "Delete"]  # Cancel gone with the wait; its chain (bot.chains)
        assert env.errors == []


async def test_a_moderator_may_cancel_someone_elses_request(service, bobby_jpg):
    async with running_bot(service) as env:
        channel, alice = world(env)
        mod = moderator(env)
        presses: list[InteractionResult] = []

        async def mod_cancels(placeholder: discord.Message) -> None:
            presses.append(press(env, mod, placeholder, button_id(placeholder, "Cancel")))

        when_in_line(env, mod_cancels)
        with HeldModel(service, "classify"):
            ahead = await on_the_model(service, "classify", bobby_jpg)
            await alice.send(channel, "!classify", attachments=[("bobby.jpg", bobby_jpg)])
        await ahead
        (placeholder,) = bot_messages(channel, env)
        assert placeholder.content == "🚫 Cancelled before it reached the model."
        assert presses[0].acknowledged and not presses[0].ephemeral
        assert service.pending_for(alice.id) == 0 and env.errors == []


async def test_a_waiting_request_that_fails_loses_its_cancel_button(service, bobby_jpg):
    async with running_bot(service) as env:
        channel, alice = world(env)
        photos = [("a.jpg", bobby_jpg), ("broken.jpg", b"not an image at all")]
        await alice.send(channel, "!classify", attachments=photos)
        answer, error = bot_messages(channel, env)  # both waited: placeholders, edited
        assert buttons(answer) == ["Zebra-fy", "Delete"]
        assert error.content.startswith("⚠️") and "not an image" in error.content
        assert error.components == []  # nothing left to cancel, nothing to delete
        assert len(env.bot.waiting) == 0 and env.errors == []


# --- Delete -----------------------------------------------------------------------------------


async def test_every_answer_has_delete_for_the_requester_and_moderators_only(service, bobby_jpg, horse_jpg):
    async with running_bot(service) as env:
        channel, alice = world(env)
        bob = env.guild.add_member(env.create_user("bob"))
        mod = moderator(env)

        await alice.send(channel, "!classify", attachments=[("bobby.jpg", bobby_jpg)])
        classify = channel.last_message
        await alice.send(channel, "!zebra", attachments=[("SPOILER_horse.jpg", horse_jpg)])
        zebra = channel.last_message
        caption = (await alice.slash(channel, "caption", image=("horse.jpg", horse_jpg))).response.message
        # Delete last, after the answer's chain buttons (`bot.chains`; a slash command's caption has none).
        assert buttons(classify) == ["Zebra-fy", "Delete"] and buttons(caption) == ["Delete"]
        assert buttons(zebra) == ["Caption this", "Classify this", "Delete"]
        assert zebra.attachments[0].is_spoiler()  # the button changes nothing else

        refused = await bob.click(classify, label="Delete")
        assert refused.ephemeral and "isn't your request" in refused.response.content
        assert classify.id in {m.id for m in channel.history()}

        await alice.click(classify, label="Delete")
        await mod.click(zebra, label="Delete")  # Manage Messages: anyone's answer
        await alice.click(caption, label="Delete")
        assert not {classify.id, zebra.id, caption.id} & {m.id for m in channel.history()}
        assert env.errors == []


async def test_delete_still_works_after_the_bot_restarts(service, bobby_jpg):
    settings = service.settings.replace(bot_data_dir=service.settings.bot_data_dir / "restart")
    bots = [create_bot(settings, service=service) for _ in range(2)]
    try:
        async with simcord.run(bots[0], settle_timeout=SETTLE_TIMEOUT_S) as env:
            channel, alice = world(env)
            bob = env.guild.add_member(env.create_user("bob"))
            await alice.send(channel, "!classify", attachments=[("bobby.jpg", bobby_jpg)])
            answer = channel.last_message
            assert top_label(answer.embeds[0]) == "golden retriever"

            await env.restart_bot(bots[1])  # a new process: the first bot's views are gone
            assert env.bot is bots[1]

            refused = await bob.click(answer, label="Delete")
            assert refused.ephemeral and "isn't your request" in refused.response.content
            await alice.click(answer, label="Delete")
            assert answer.id not in {m.id for m in channel.history()}
            assert env.errors == []
    finally:
        for bot in bots:
            await bot.close()
