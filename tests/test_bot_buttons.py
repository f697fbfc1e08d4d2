"""The buttons of issue 8, through simcord: Cancel on a request waiting in line, Delete on every
answer (also after the bot restarts), pressed by the requester, a moderator or someone else."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def model_held(service, task: str) -> Iterator[None]:
    """The task's worker process stopped (SIGSTOP) while inside: whatever it holds stays there,
    and the requests behind it wait in line; it goes on (SIGCONT) on leaving."""
    pid = service.stats()[task].worker_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def press(env: simcord.Env, actor: simcord.MemberActor, message: discord.Message, label: str) -> InteractionResult:
    """`actor` presses the button `label` of `message` *now*, while the bot is busy with a
    command (an actor's `click` waits for the bot to settle, which a request held in line never
    does): the same INTERACTION_CREATE that `click` sends, without the wait.  The bot handles it
    within the settling of the command in progress."""
    backend = env.backend
    stored = backend.get_message(message.channel.id, message.id)
    (button,) = [c for row in stored.components for c in row["components"] if c.get("label") == label]
    data = {"custom_id": button["custom_id"], "component_type": discord.ComponentType.button.value}
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
            print("PLACEHOLDER", placeholder.content, placeholder.components, flush=True)
            assert buttons(placeholder) == ["Cancel"]
            presses.append(press(env, alice, placeholder, "Cancel"))

        when_in_line(env, alice_cancels)
        with model_held(service, "classify"):
            ahead = service.submit("classify", bobby_jpg)  # someone else's, on the model
            await alice.send(channel, "!classify", attachments=[("bobby.jpg", bobby_jpg)])
            (placeholder,) = bot_messages(channel, env)
            assert placeholder.content == "🚫 Cancelled before it reached the model."
            assert placeholder.components == [] and not placeholder.embeds
            assert presses[0].acknowledged and not presses[0].ephemeral  # the press edited it
        await ahead  # the one ahead still gets its answer
        after = service.stats()["classify"]
        assert after.cancelled == before.cancelled + 1
        assert after.ran == before.ran + 1  # only the one ahead went through the model
        assert env.bot.waiting.__len__() == 0 and service.pending_for(alice.id) == 0

        # Its message still shows Cancel to someone whose client is behind: told it is over.
        late = await alice.click(placeholder, label="Cancel") if placeholder.components else None
        assert late is None
        assert env.errors == []


async def test_cancel_by_someone_else_is_refused_and_the_request_answered(service, bobby_jpg):
    async with running_bot(service) as env:
        channel, alice = world(env)
        bob = env.guild.add_member(env.create_user("bob"))
        presses: list[InteractionResult] = []
        held = model_held(service, "classify")

        async def bob_presses(placeholder: discord.Message) -> None:
            presses.append(press(env, bob, placeholder, "Cancel"))
            while not presses[0].acknowledged:
                await asyncio.sleep(0.01)
            held.__exit__(None, None, None)  # the model goes on: the request is answered

        when_in_line(env, bob_presses)
        held.__enter__()
        try:
            ahead = service.submit("classify", bobby_jpg)
            await alice.send(channel, "!classify", attachments=[("bobby.jpg", bobby_jpg)])
        finally:
            held.__exit__(None, None, None)
        await ahead
        (refusal,) = presses
        assert refusal.ephemeral and "isn't your request" in refusal.response.content
        (answer,) = bot_messages(channel, env)
        assert top_label(answer.embeds[0]) == "golden retriever" and "in line" not in answer.content
        assert buttons(answer) == ["Delete"]  # Cancel gone with the wait
        assert env.errors == []


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
        for answer in (classify, zebra, caption):
            assert buttons(answer) == ["Delete"]
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
