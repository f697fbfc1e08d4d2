"""Chain buttons (issue 8), through simcord with the real models: **Zebra-fy** on a classify or
caption answer runs on the original image, **Caption this** / **Classify this** on a zebra answer
on the generated one; pressed by anyone (who then is the one asking), after a restart too, and
answered privately when the original is gone."""

from __future__ import annotations

import io

import discord
import pytest
import simcord

from bot import create_bot
from bot.chains import SOURCE_GONE
from tests.test_bot import SETTLE_TIMEOUT_S, running_bot, service, top_label, world  # noqa: F401
from tests.conftest import IMAGES
from tests.test_bot_buttons import buttons

pytestmark = pytest.mark.asyncio(loop_scope="module")


def small(name: str) -> bytes:
    """A sample photo at 320×180: every press here runs a model on a shared 2-core machine."""
    from PIL import Image

    with Image.open(IMAGES / name) as image:
        buffer = io.BytesIO()
        image.convert("RGB").resize((320, 180)).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()


@pytest.fixture(scope="module")
def dog() -> bytes:
    return small("bobby.jpg")


@pytest.fixture(scope="module")
def horse() -> bytes:
    return small("horse.jpg")


def delete_owner(message: discord.Message) -> int:
    """Whose answer it is: the requester in its Delete button's custom_id."""
    children = [child for row in message.components for child in row.children]  # type: ignore[attr-defined]
    (custom_id,) = [child.custom_id for child in children if child.label == "Delete"]
    return int(custom_id.rsplit(":", 1)[1])


async def test_zebra_fy_a_classify_answer_then_caption_and_classify_the_zebra(service, dog):
    async with running_bot(service) as env:
        channel, alice = world(env)
        bob = env.guild.add_member(env.create_user("bob"))
        await alice.send(channel, "!classify", attachments=[("bobby.jpg", dog)])
        classify = channel.last_message
        assert buttons(classify) == ["Zebra-fy", "Delete"]

        zebra = (await bob.click(classify, label="Zebra-fy")).response  # anyone may press
        assert zebra is not None and not zebra.ephemeral
        zebra = zebra.message
        assert zebra.content.startswith("🦓 bobby.jpg") and zebra.attachments[0].filename == "zebra.png"
        assert buttons(zebra) == ["Caption this", "Classify this", "Delete"]
        assert delete_owner(zebra) == bob.id  # the presser asked: it is his answer

        caption = (await alice.click(zebra, label="Caption this")).response.message
        assert caption.content.startswith("📝 zebra.png: ") and len(caption.content) > len("📝 zebra.png: ")
        assert buttons(caption) == ["Zebra-fy", "Delete"] and delete_owner(caption) == alice.id
        classified = (await alice.click(zebra, label="Classify this")).response.message
        assert classified.embeds[0].title == "What's in zebra.png?"
        assert service.stats()["zebra"].done and env.errors == []


async def test_a_spoilered_zebra_answer_chains_as_a_spoiler(service, horse):
    async with running_bot(service) as env:
        channel, alice = world(env)
        await alice.send(channel, "!zebra", attachments=[("SPOILER_horse.jpg", horse)])
        zebra = channel.last_message
        assert zebra.attachments[0].is_spoiler()
        caption = (await alice.click(zebra, label="Caption this")).response.message
        assert caption.content.startswith("📝 ||zebra.png||: ||") and caption.content.endswith("||")
        assert env.errors == []


async def test_a_chain_press_is_a_request_of_the_presser_with_the_cooldown(service, dog):
    async with running_bot(service, heavy_command_cooldown_s=600) as env:
        channel, alice = world(env)
        bob = env.guild.add_member(env.create_user("bob"))
        await alice.send(channel, "!classify", attachments=[("bobby.jpg", dog)])
        classify = channel.last_message
        first = await bob.click(classify, label="Zebra-fy")
        assert first.response.message.attachments  # bob's zebra
        second = await bob.click(classify, label="Zebra-fy")  # zebra is heavy: bob cools down
        (refusal,) = second.followups  # only to bob; the "thinking…" message is gone
        assert refusal.ephemeral and second.response is None
        assert "Easy there — you can use `zebra` again in" in refusal.content
        third = await alice.click(classify, label="Zebra-fy")  # alice has her own cooldown
        assert third.response.message.attachments
        assert env.errors == []


async def test_zebra_fy_after_the_original_is_deleted_answers_privately(service, dog):
    async with running_bot(service) as env:
        channel, alice = world(env)
        bob = env.guild.add_member(env.create_user("bob"))
        photo = await bob.send(channel, "my dog", attachments=[("bobby.jpg", dog)])
        command = await alice.send(channel, "!caption", reply_to=photo)  # the image is in the replied-to message
        caption = channel.last_message
        assert buttons(caption) == ["Zebra-fy", "Delete"]
        zebras = service.stats()["zebra"].submitted
        await bob.delete(photo)
        gone = await alice.click(caption, label="Zebra-fy")
        assert gone.ephemeral and gone.response.content == SOURCE_GONE
        await alice.delete(command)
        gone = await alice.click(caption, label="Zebra-fy")
        assert gone.ephemeral and gone.response.content == SOURCE_GONE
        assert service.stats()["zebra"].submitted == zebras  # nothing was asked of the model
        assert env.errors == []


async def test_chain_buttons_work_after_the_bot_restarts(service, dog):
    settings = service.settings.replace(bot_data_dir=service.settings.bot_data_dir / "chains-restart")
    bots = [create_bot(settings, service=service) for _ in range(2)]
    try:
        async with simcord.run(bots[0], settle_timeout=SETTLE_TIMEOUT_S) as env:
            channel, alice = world(env)
            await alice.send(channel, "!classify", attachments=[("bobby.jpg", dog)])
            classify = channel.last_message
            assert top_label(classify.embeds[0]) == "golden retriever"

            await env.restart_bot(bots[1])  # a new process: nothing of the first bot's is left
            zebra = (await alice.click(classify, label="Zebra-fy")).response.message
            assert zebra.attachments and buttons(zebra) == ["Caption this", "Classify this", "Delete"]
            classified = (await alice.click(zebra, label="Classify this")).response.message
            assert classified.embeds[0].title == "What's in zebra.png?"
            assert env.errors == []
    finally:
        for bot in bots:
            await bot.close()
