"""The real bot from `create_bot`, driven through simcord: discord.py's own code, offline.

How the tests wait for answers (simcord "settles" the event loop after every action):

- A command awaits its result from a worker *process*; the result reaches the event loop from
  a reader thread.  To simcord that await is an "unknown wait" — one it cannot prove will end —
  and settling keeps joining it, up to `settle_timeout`, until the command has answered.  That
  is the documented budget for bot work still running, so `SETTLE_TIMEOUT_S` is sized for a
  model call on a busy 2-core machine.  (`env.external_wait` is for waits that stay parked
  until the *test* supplies input; with it an actor would return before the answer exists.)
- One service, started and warmed up before a bot is attached, serves most tests here (loop
  scope "module"), which keeps model loading to once per module.
- `test_bot_creates_starts_and_closes_its_own_service` covers the bot building, starting
  (in `setup_hook`), using from its very first command, and closing (in `close()`) a service of
  its own: the service's own tasks run in contexts of their own, never counted as the bot's.
"""

from __future__ import annotations

import asyncio
import io
import logging
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import discord
import pytest
import pytest_asyncio
import simcord
from PIL import Image

from bot import create_bot
from bot.errors import NoImageFound, unwrap
from bot.urls import ImageFetcher
from config import Settings
from inference.errors import ServiceClosed
from inference.service import InferenceService
from tests.httpserver import LocalHTTPServer

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: Longest a single actor action may take: a model call (the models are loaded already) on a
#: 2-core machine that other test runs share.
SETTLE_TIMEOUT_S = 90.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def service(generated_weights_dir: Path, bobby_jpg: bytes, tmp_path_factory) -> AsyncIterator[InferenceService]:
    bot_data = tmp_path_factory.mktemp("bot-data")
    settings = Settings(weights_dir=generated_weights_dir, heavy_command_cooldown_s=0, bot_data_dir=bot_data)
    service = InferenceService(settings)
    await service.start()
    # One real request per model: loads every model and starts each dispatcher, outside any bot.
    await asyncio.gather(service.classify(bobby_jpg), service.zebra(bobby_jpg), service.caption(bobby_jpg))
    yield service
    await service.close()


@asynccontextmanager
async def running_bot(
    service: InferenceService,
    *,
    url_fetcher: ImageFetcher | None = None,
    message_content: bool = True,
    approved_intents: discord.Intents | None = None,
    **settings_changes: object,
) -> AsyncIterator[simcord.Env]:
    """A bot from `create_bot` on the shared service, attached to a fresh simcord world (a new
    Discord: a data directory of its own, so the bot syncs its commands there)."""
    settings_changes.setdefault("bot_data_dir", Path(tempfile.mkdtemp(dir=service.settings.bot_data_dir)))
    settings = service.settings.replace(**settings_changes)
    bot = create_bot(settings, service=service, url_fetcher=url_fetcher, message_content=message_content)
    try:
        async with simcord.run(bot, settle_timeout=SETTLE_TIMEOUT_S, approved_intents=approved_intents) as env:
            yield env
    finally:
        await bot.close()


def world(env: simcord.Env) -> tuple[simcord.ChannelHandle, simcord.MemberActor]:
    channel = env.create_guild().create_text_channel("general")
    alice = env.guild.add_member(env.create_user("alice"))
    return channel, alice


def bot_messages(channel: simcord.ChannelHandle, env: simcord.Env) -> list[discord.Message]:
    return [m for m in channel.history() if m.author.id == env.bot.user.id]


def top_label(embed: discord.Embed) -> str:
    """The label of the first bar row of a classification embed."""
    first_row = embed.description.strip("`\n").splitlines()[0]
    return first_row.split("%", 1)[1].strip()


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
        return image.size


# --- classify --------------------------------------------------------------------------------


async def test_classify_prefix_command_answers_golden_retriever(service, bobby_jpg):
    async with running_bot(service) as env:
        channel, alice = world(env)

        command = await alice.send(channel, "!classify", attachments=[("bobby.jpg", bobby_jpg)])

        answer = channel.last_message
        assert answer.author.id == env.bot.user.id
        assert answer.reference is not None and answer.reference.message_id == command.id
        embed = answer.embeds[0]
        assert top_label(embed) == "golden retriever"
        assert embed.fields[0].value.startswith("**golden retriever**")
        assert len(embed.description.strip("`\n").splitlines()) == 5  # top 5, one bar each
        # The typing indicator was on while the model worked.
        assert any(r.method == "POST" and r.path.endswith("/typing") for r in env.http_requests)
        assert env.errors == []


async def test_classify_slash_command_and_context_menu(service, bobby_jpg):
    async with running_bot(service) as env:
        channel, alice = world(env)

        slash = await alice.slash(channel, "classify", image=("bobby.jpg", bobby_jpg))
        # Deferred ("thinking…") while the model worked; the answer then completed that reply.
        assert any(r.path.endswith("/callback") and (r.json or {}).get("type") == 5 for r in env.http_requests)
        assert top_label(slash.response.embeds[0]) == "golden retriever"

        # Someone else's message with a photo; Apps → "Classify image" on it.
        bob = env.guild.add_member(env.create_user("bob"))
        photo = await bob.send(channel, "look at him", attachments=[("bobby.jpg", bobby_jpg)])
        menu = await alice.context_menu(channel, "Classify image", photo)
        assert top_label(menu.response.embeds[0]) == "golden retriever"
        assert env.errors == []


async def test_context_menus_work_without_the_message_content_intent(service, bobby_jpg):
    # The portal's Message Content switch is off, and the bot does not ask for it.
    async with running_bot(service, message_content=False, approved_intents=discord.Intents.default()) as env:
        channel, alice = world(env)
        bob = env.guild.add_member(env.create_user("bob"))

        photo = await bob.send(channel, "!classify look", attachments=[("bobby.jpg", bobby_jpg)])
        assert bot_messages(channel, env) == []  # the bot cannot read that command

        menu = await alice.context_menu(channel, "Classify image", photo)
        assert top_label(menu.response.embeds[0]) == "golden retriever"
        assert env.errors == []


async def test_classify_answers_each_attachment_with_queue_positions_edited_into_results(service, bobby_jpg, horse_jpg):
    async with running_bot(service) as env:
        channel, alice = world(env)

        await alice.send(channel, "!classify", attachments=[("bobby.jpg", bobby_jpg), ("horse.jpg", horse_jpg)])

        answers = bot_messages(channel, env)
        assert len(answers) == 2
        # The second photo waited behind the first: both got a "you're in line" reply at once…
        posted = [r for r in env.http_requests if r.method == "POST" and r.path.endswith("/messages")]
        assert [("in line" in ((r.json or {}).get("content") or "")) for r in posted] == [True, True]
        assert "1 request ahead" in posted[1].json["content"]
        # …and each was edited into its own result, in order.
        edits = [r for r in env.http_requests if r.method == "PATCH" and "/messages/" in r.path]
        assert {r.path.rsplit("/", 1)[1] for r in edits} == {str(m.id) for m in answers}
        assert [m.embeds[0].title for m in answers] == ["What's in bobby.jpg?", "What's in horse.jpg?"]
        assert top_label(answers[0].embeds[0]) == "golden retriever"
        assert all("in line" not in (m.content or "") and m.edited_at is not None for m in answers)
        assert env.errors == []


# --- zebra and caption -----------------------------------------------------------------------


async def test_zebra_and_caption_answer_and_keep_spoilers(service, horse_jpg):
    # The caption the models give this photo (decoding is deterministic): the bot must show it
    # word for word, not just "some words".
    expected_caption = await service.caption(horse_jpg)
    assert expected_caption.split()
    async with running_bot(service) as env:
        channel, alice = world(env)

        await alice.send(channel, "!zebra", attachments=[("horse.jpg", horse_jpg)])
        zebra = channel.last_message
        assert zebra.content.startswith("🦓")
        (file,) = zebra.attachments
        assert file.filename == "zebra.png" and not file.is_spoiler()
        width, height = png_size(await file.read())
        assert min(width, height) == service.settings.zebra_size  # the generator's working size
        with Image.open(io.BytesIO(horse_jpg)) as horse:
            assert abs(width / height - horse.width / horse.height) < 0.02  # aspect kept

        await alice.send(channel, "!caption", attachments=[("horse.jpg", horse_jpg)])
        caption = channel.last_message
        assert caption.content == f"📝 horse.jpg: {expected_caption}"

        # Sent as spoilers, answered as spoilers.
        await alice.send(channel, "!zebra", attachments=[("SPOILER_horse.jpg", horse_jpg)])
        (file,) = channel.last_message.attachments
        assert file.is_spoiler() and file.filename == "SPOILER_zebra.png"
        await alice.send(channel, "!caption", attachments=[("SPOILER_horse.jpg", horse_jpg)])
        text = channel.last_message.content
        # The file name stays behind the spoiler too.
        assert text == f"📝 ||horse.jpg||: ||{expected_caption}||"
        assert env.errors == []


async def test_zebra_slash_command_returns_a_file(service, horse_jpg):
    async with running_bot(service) as env:
        channel, alice = world(env)
        result = await alice.slash(channel, "zebra", image=("horse.jpg", horse_jpg))
        (file,) = result.response.attachments
        assert png_size(await file.read())[1] == service.settings.zebra_size
        assert env.errors == []


# --- where the image comes from ------------------------------------------------------------------


async def test_reply_to_a_message_with_an_attachment(service, bobby_jpg):
    async with running_bot(service) as env:
        channel, alice = world(env)
        bob = env.guild.add_member(env.create_user("bob"))
        photo = await bob.send(channel, "my dog", attachments=[("bobby.jpg", bobby_jpg)])

        await alice.send(channel, "!classify", reply_to=photo)

        assert top_label(channel.last_message.embeds[0]) == "golden retriever"
        assert env.errors == []


async def test_image_links_in_the_message_and_in_a_replied_embed(service, bobby_jpg):
    with LocalHTTPServer() as server:
        server.serve("/photos/bobby", bobby_jpg, content_type="image/jpeg")  # no file extension
        server.redirect("/short", "/photos/bobby")
        settings = service.settings.replace(allow_http_urls=True)
        # The address guard relaxed for this test's loopback server only.
        fetcher = ImageFetcher(settings, allow_loopback_for_tests=True)
        async with running_bot(service, url_fetcher=fetcher, allow_http_urls=True) as env:
            channel, alice = world(env)

            await alice.send(channel, f"what is this? {server.url('/short')}")
            assert bot_messages(channel, env) == []  # not a command: no answer, no download
            await alice.send(channel, f"!classify <{server.url('/short')}>")
            assert top_label(channel.last_message.embeds[0]) == "golden retriever"
            slash = await alice.slash(channel, "classify", url=server.url("/photos/bobby"))
            assert top_label(slash.response.embeds[0]) == "golden retriever"

            # A service posts an embed with an image; a reply to it is enough.
            hook = env.guild.create_webhook(channel)
            posted = await hook.send(embed=discord.Embed(title="photo").set_image(url=server.url("/photos/bobby")))
            await alice.send(channel, "!classify", reply_to=posted)
            assert top_label(channel.last_message.embeds[0]) == "golden retriever"

            assert server.count("/short") == 1 and server.count("/photos/bobby") == 3
            assert env.errors == []


async def test_the_real_address_guard_refuses_loopback_links(service, bobby_jpg):
    with LocalHTTPServer() as server:
        url = server.serve("/bobby.jpg", bobby_jpg)
        async with running_bot(service, allow_http_urls=True) as env:  # the bot's own fetcher
            channel, alice = world(env)
            await alice.send(channel, f"!classify {url}")
            assert "public addresses" in channel.last_message.content
        assert server.request_count == 0  # refused before connecting


# --- errors -----------------------------------------------------------------------------------


async def test_a_file_that_is_not_an_image_gets_a_clear_reply(service):
    async with running_bot(service) as env:
        channel, alice = world(env)
        await alice.send(channel, "!classify", attachments=[("cat.jpg", b"this is not a JPEG at all")])
        reply = channel.last_message.content
        assert reply.startswith("⚠️") and "not an image" in reply
        assert "Traceback" not in reply
        assert env.errors == []  # answered per image: not a command failure


async def test_no_image_gets_a_usage_reply(service):
    async with running_bot(service) as env:
        channel, alice = world(env)

        await alice.send(channel, "!zebra")
        assert "I need an image" in channel.last_message.content and "/zebra" in channel.last_message.content

        slash = await alice.slash(channel, "caption")
        assert slash.ephemeral and "I need an image" in slash.response.content

        text_only = await alice.send(channel, "just words")
        menu = await alice.context_menu(channel, "Zebra-fy image", text_only)
        assert menu.ephemeral and "no image" in menu.response.content

        assert [type(unwrap(e)) for e in env.errors] == [NoImageFound] * 3


async def test_a_busy_queue_gets_a_retry_hint(service, bobby_jpg):
    cap = service.settings.max_pending_per_user
    async with running_bot(service, max_images_per_message=cap + 1) as env:
        channel, alice = world(env)

        photos = [(f"{i}.jpg", bobby_jpg) for i in range(cap + 1)]
        await alice.send(channel, "!classify", attachments=photos)

        answers = bot_messages(channel, env)
        assert sum(1 for m in answers if m.embeds) == cap
        (busy,) = [m for m in answers if not m.embeds]
        assert busy.content.startswith("⚠️ I'm busy right now — try again in ~")
        assert busy.content.endswith(" s.")
        assert service.pending_for(alice.id) == 0  # nothing left behind
        assert env.errors == []


async def test_heavy_commands_have_a_per_user_cooldown(service, horse_jpg):
    async with running_bot(service, heavy_command_cooldown_s=30) as env:
        channel, alice = world(env)
        bob = env.guild.add_member(env.create_user("bob"))

        await alice.send(channel, "!caption", attachments=[("horse.jpg", horse_jpg)])
        assert channel.last_message.content.startswith("📝")
        await alice.send(channel, "!caption", attachments=[("horse.jpg", horse_jpg)])
        assert channel.last_message.content.startswith("⚠️ Easy there — you can use `caption` again in ")

        # Per user, per command; the same bucket behind the slash form.
        slash = await alice.slash(channel, "caption", image=("horse.jpg", horse_jpg))
        assert "Easy there" in slash.response.content
        await bob.send(channel, "!caption", attachments=[("horse.jpg", horse_jpg)])
        assert channel.last_message.content.startswith("📝")
        # classify is light: no cooldown.
        await alice.send(channel, "!classify", attachments=[("horse.jpg", horse_jpg)])
        await alice.send(channel, "!classify", attachments=[("horse.jpg", horse_jpg)])
        assert channel.last_message.embeds

        assert [type(unwrap(e)).__name__ for e in env.errors] == ["CommandOnCooldown"] * 2


async def test_an_internal_error_is_logged_with_context_and_answered_briefly(service, bobby_jpg, caplog):
    token = "MTAxMjM0NTY3ODkwMTIzNDU2Nzg5.GAbCdE.abcdefghijklmnopqrstuvwxyz0123456789AB"
    async with running_bot(service, discord_token=token) as env:
        channel, alice = world(env)
        env.inject_error("POST", "/channels/*/messages", status=500, times=1)  # the answer fails

        with caplog.at_level(logging.DEBUG):
            await alice.send(channel, "!classify", attachments=[("bobby.jpg", bobby_jpg)])

        reply = channel.last_message.content
        assert reply == "⚠️ Something went wrong on my side; it has been logged. Please try again later."
        (record,) = [r for r in caplog.records if r.name == "bot.errors"]
        assert "'classify'" in record.getMessage() and str(alice.id) in record.getMessage()
        assert record.exc_info is not None  # the traceback goes to the log, not the channel
        assert token not in caplog.text and token not in repr(env.bot.settings)
        # Handled for that image (the other images of a message would still be answered).
        assert isinstance(record.exc_info[1], discord.HTTPException) and env.errors == []


# --- help, models, channels, life cycle -------------------------------------------------------------


async def test_help_and_models(service):
    async with running_bot(service) as env:
        channel, alice = world(env)

        await alice.send(channel, "!help")
        fields = [f.name for f in channel.last_message.embeds[0].fields]
        assert fields == ["classify", "zebra", "caption", "style", "models", "status", "config", "help"]
        # Every command a member may use is on it (`!sync` is the owner's, hidden).
        assert set(fields) == {command.name for command in env.bot.commands if not command.hidden}

        result = await alice.slash(channel, "models")
        embed = result.response.embeds[0]
        states = {f.name: f.value for f in embed.fields}
        assert set(states) == {"classify", "zebra", "caption"}
        assert "`efficientnet_lite0` — ready" in states["classify"]
        runtime = {state.task: state.runtime for state in service.models()}["zebra"]
        assert runtime in ("onnx", "torch")  # INFERENCE_RUNTIME=auto: whichever its export measured faster
        assert f"— ready ({runtime} on cpu" in states["zebra"] and "Missing" not in states["zebra"]
        # (A weights directory without the CycleGAN file: tests/test_bot_commands.py.)


async def test_commands_are_synced_and_channels_can_be_restricted(service):
    async with running_bot(service) as env:
        guild = env.create_guild()
        allowed = guild.create_text_channel("bots")
        elsewhere = guild.create_text_channel("general")
        alice = guild.add_member(env.create_user("alice"))
        commands = set(alice.available_commands(elsewhere))
        assert {"classify", "zebra", "caption", "models", "help"} <= commands
        menus = {c.name for c in env.bot.tree.get_commands(type=discord.AppCommandType.message)}
        assert menus == {"Classify image", "Zebra-fy image", "Caption image"}

        env.bot.settings = env.bot.settings.replace(allowed_channels=frozenset({allowed.id}))
        await alice.send(elsewhere, "!help")
        assert bot_messages(elsewhere, env) == []  # silent where it does not serve
        refused = await alice.slash(elsewhere, "help")
        assert refused.ephemeral and "don't answer commands in this channel" in refused.response.content
        await alice.send(allowed, "!help")
        assert bot_messages(allowed, env)[-1].embeds
        assert len(env.errors) == 2  # the two refusals, each answered as above


async def test_bot_creates_starts_and_closes_its_own_service(generated_weights_dir, bobby_jpg, tmp_path):
    bot = create_bot(Settings(weights_dir=generated_weights_dir, bot_data_dir=tmp_path))
    async with simcord.run(bot, settle_timeout=SETTLE_TIMEOUT_S) as env:
        channel, alice = world(env)
        await alice.send(channel, "!models")
        assert {f.name for f in channel.last_message.embeds[0].fields} == {"classify", "zebra", "caption"}
        assert bot.service.models()[0].state == "idle"  # models load on first use
        await alice.send(channel, "!classify", attachments=[("bobby.jpg", bobby_jpg)])
        assert top_label(channel.last_message.embeds[0]) == "golden retriever"
    await bot.close()
    with pytest.raises(ServiceClosed):
        bot.service.submit("classify", b"")
