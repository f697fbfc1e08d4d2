"""The bot's failure paths (issue 12, section 4), through discord.py's own code in simcord.

Where simcord does not model what Discord does (it accepts a reply to a deleted message, and
its HTTP session never closes), a test makes the simulated Discord more faithful — a reply
whose target is gone is refused unless `fail_if_not_exists` is false; requests after the
session closed raise like aiohttp does — instead of changing anything in the bot.  Everything
the bot does still goes through discord.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import discord
import pytest
from simcord.backend.errors import BackendError

from bot.errors import ChannelNotAllowed, NoImageFound, unwrap
from bot.urls import ImageFetcher
from tests.httpserver import LocalHTTPServer
from tests.test_bot import bot_messages, running_bot, service, top_label, world  # noqa: F401 (fixture)

pytestmark = pytest.mark.asyncio(loop_scope="module")


def loopback_fetcher(service) -> ImageFetcher:
    return ImageFetcher(service.settings.replace(allow_http_urls=True), allow_loopback_for_tests=True)


def posted_messages(env) -> list[Any]:
    return [r for r in env.http_requests if r.method == "POST" and r.path.endswith("/messages")]


def replies_to_gone_messages_fail_like_discord(env, monkeypatch) -> None:
    """Discord refuses a reply to a deleted message (400, Invalid Form Body) unless the
    reference says `fail_if_not_exists: false`, in which case it sends a plain message."""
    backend = env.backend
    normalize = backend.normalize_message_reference

    def faithful(channel_id: int, reference: dict[str, Any] | None) -> dict[str, Any] | None:
        normalized = normalize(channel_id, reference)
        if normalized is None or normalized["type"] != 0:
            return normalized
        try:
            backend.get_message(int(normalized["channel_id"]), int(normalized["message_id"]))
        except BackendError:
            if normalized["fail_if_not_exists"]:
                raise BackendError(400, 50035, "Invalid Form Body: message_reference: Unknown message") from None
            return None
        return normalized

    monkeypatch.setattr(backend, "normalize_message_reference", faithful)


def before_request(env, route: str, action) -> None:
    """Run `action()` once, just before the bot's first request to `route` ("METHOD path")."""
    http = env.bot.http
    request = http.request
    done: list[bool] = []

    async def requesting(route_, **kwargs: Any) -> Any:
        if not done and f"{route_.method} {route_.path}" == route:
            done.append(True)
            action()
        return await request(route_, **kwargs)

    http.request = requesting


# --- one failed send never aborts the rest ---------------------------------------------------------


async def test_a_placeholder_deleted_by_a_moderator_costs_no_answer(service, bobby_jpg, horse_jpg):
    async with running_bot(service) as env:
        channel, alice = world(env)
        deleted: list[int] = []

        async def moderator_deletes_the_first_placeholder(message: discord.Message) -> None:
            if message.author.id == env.bot.user.id and "in line" in message.content and not deleted:
                deleted.append(message.id)
                env.backend.delete_message(message.channel.id, message.id)  # gone before it is edited

        env.bot.add_listener(moderator_deletes_the_first_placeholder, "on_message")
        photos = [("a.jpg", bobby_jpg), ("b.jpg", horse_jpg), ("c.jpg", bobby_jpg)]
        await alice.send(channel, "!classify", attachments=photos)

        assert deleted  # there were placeholders, and the first one went
        answers = bot_messages(channel, env)
        assert sorted(m.embeds[0].title for m in answers) == ["What's in a.jpg?", "What's in b.jpg?", "What's in c.jpg?"]
        assert all("in line" not in m.content for m in answers)
        assert env.errors == []


async def test_a_missing_attach_files_permission_costs_that_answer_only(service, horse_jpg):
    async with running_bot(service) as env:
        channel, alice = world(env)
        # The first zebra file is refused as Discord refuses an upload without Attach Files.
        env.inject_error("PATCH", "/channels/*/messages/*", status=403, code=50013, message="Missing Permissions")

        photos = [(f"{name}.jpg", horse_jpg) for name in "abc"]
        await alice.send(channel, "!zebra", attachments=photos)

        answers = bot_messages(channel, env)
        assert len(answers) == 3
        refused = [m for m in answers if not m.attachments]
        assert len(refused) == 1 and "missing a permission" in refused[0].content and "Attach Files" in refused[0].content
        assert sum(1 for m in answers if m.attachments and m.content.startswith("🦓")) == 2
        assert env.errors == []


async def test_answers_to_a_deleted_command_message_come_as_plain_messages(service, bobby_jpg, monkeypatch):
    async with running_bot(service) as env:
        channel, alice = world(env)
        replies_to_gone_messages_fail_like_discord(env, monkeypatch)
        def author_deletes_the_command() -> None:
            # While the bot is typing (working on it), the author deletes the command message.
            (command,) = [m for m in env.backend.messages[channel.id].values() if m.author_id == alice.id]
            env.backend.delete_message(channel.id, command.id)

        before_request(env, "POST /channels/{channel_id}/typing", author_deletes_the_command)
        photos = [("a.jpg", bobby_jpg), ("b.jpg", bobby_jpg), ("broken.jpg", b"not an image at all")]
        command = await alice.send(channel, "!classify", attachments=photos)

        assert command.id not in {m.id for m in channel.history()}
        answers = bot_messages(channel, env)
        assert [m.embeds[0].title for m in answers if m.embeds] == ["What's in a.jpg?", "What's in b.jpg?"]
        (error,) = [m for m in answers if not m.embeds]
        assert error.content.startswith("⚠️") and "not an image" in error.content  # bot/errors.py too
        assert all(m.reference is None for m in answers)  # the target is gone: plain messages
        references = [r.json.get("message_reference") for r in posted_messages(env)]
        assert len(references) == 3 and all(ref["fail_if_not_exists"] is False for ref in references)
        assert env.errors == []


# --- spoilers never leak ------------------------------------------------------------------------------


async def test_spoilered_links_and_embeds_stay_spoilered_in_every_answer(service, bobby_jpg, horse_jpg):
    with LocalHTTPServer() as server:
        secret = server.serve("/secret.jpg", horse_jpg, content_type="image/jpeg")
        dog = server.serve("/dog", bobby_jpg, content_type="image/jpeg")
        async with running_bot(service, url_fetcher=loopback_fetcher(service), allow_http_urls=True) as env:
            channel, alice = world(env)

            await alice.send(channel, f"!caption ||{secret}||")
            caption = channel.last_message
            assert caption.content.startswith(f"📝 ||<{secret}>||: ||") and caption.content.endswith("||")
            assert caption.flags.suppress_embeds  # Discord shows no preview of the link
            assert secret not in caption.content.replace(f"||<{secret}>||", "")

            await alice.send(channel, f"!classify ||{dog}||")  # classify keeps a link's spoiler
            embed = channel.last_message.embeds[0]
            assert secret not in embed.title and dog not in embed.title
            lines = embed.description.splitlines()
            assert lines[0] == f"||{dog}||" and all(line.startswith("||") and line.endswith("||") for line in lines)
            assert "golden retriever" in embed.description and not embed.fields

            # A spoilered link with Discord's preview embed of it: the embed is the spoiler too.
            hook = env.guild.create_webhook(channel)
            preview = discord.Embed(url=secret, type="image").set_thumbnail(url=secret)
            posted = await hook.send(f"||{secret}||", embed=preview)
            await alice.send(channel, "!zebra", reply_to=posted)
            zebra = channel.last_message
            (file,) = zebra.attachments
            assert file.is_spoiler() and zebra.content == f"🦓 ||<{secret}>||, zebra-fied"
            assert zebra.flags.suppress_embeds
            assert env.errors == []


async def test_a_spoilered_attachment_keeps_its_name_hidden_in_classify(service, bobby_jpg):
    async with running_bot(service) as env:
        channel, alice = world(env)
        await alice.send(channel, "!classify", attachments=[("SPOILER_mydog.jpg", bobby_jpg)])
        embed = channel.last_message.embeds[0]
        assert "mydog" not in embed.title
        lines = embed.description.splitlines()
        assert lines[0] == "||mydog.jpg||"
        assert all(line.startswith("||") and line.endswith("||") for line in lines)
        assert not embed.fields  # no "best guess" outside the spoiler

        # An error about a spoilered image is a spoiler too (it may name the file or the host).
        await alice.send(channel, "!classify", attachments=[("SPOILER_notes.jpg", b"not an image at all")])
        error = channel.last_message.content
        assert error.startswith("⚠️ ||") and error.endswith("||") and error.count("||") == 2
        assert env.errors == []


# --- say what happened ----------------------------------------------------------------------------------


async def test_images_beyond_the_limit_are_named_as_skipped(service, bobby_jpg):
    async with running_bot(service, max_images_per_message=2) as env:
        channel, alice = world(env)
        photos = [("a.jpg", bobby_jpg), ("b.jpg", bobby_jpg), ("c.jpg", bobby_jpg), ("SPOILER_d.jpg", bobby_jpg)]
        await alice.send(channel, "!classify", attachments=photos)

        answers = bot_messages(channel, env)
        assert sorted(m.embeds[0].title for m in answers if m.embeds) == ["What's in a.jpg?", "What's in b.jpg?"]
        (skipped,) = [m for m in answers if not m.embeds]
        assert skipped.content == "⚠️ I answer up to 2 images per message; skipped: c.jpg, ||d.jpg||."
        assert env.errors == []


async def test_help_and_usage_do_not_offer_prefix_commands_without_the_content_intent(service):
    async with running_bot(service, message_content=False, approved_intents=discord.Intents.default()) as env:
        channel, alice = world(env)
        help_text = (await alice.slash(channel, "help")).response.embeds[0].description
        assert "/command" in help_text and "!" not in help_text
        usage = (await alice.slash(channel, "classify")).response.content
        assert "/classify" in usage and "!classify" not in usage
        assert [type(unwrap(e)) for e in env.errors] == [NoImageFound]
    async with running_bot(service) as env:  # with it, they are offered
        channel, alice = world(env)
        assert "`!command`" in (await alice.slash(channel, "help")).response.embeds[0].description


# --- admission before download ----------------------------------------------------------------------------


async def test_images_the_queue_will_not_take_are_never_downloaded(service, bobby_jpg):
    cap = service.settings.max_pending_per_user
    with LocalHTTPServer() as server:
        urls = [server.serve(f"/{i}.jpg", bobby_jpg, content_type="image/jpeg") for i in range(cap + 1)]
        fetcher = loopback_fetcher(service)
        async with running_bot(service, url_fetcher=fetcher, allow_http_urls=True, max_images_per_message=cap + 1) as env:
            channel, alice = world(env)

            await alice.send(channel, "!classify " + " ".join(urls))
            answers = bot_messages(channel, env)
            assert sum(1 for m in answers if m.embeds) == cap
            (busy,) = [m for m in answers if not m.embeds]
            assert busy.content.startswith("⚠️ I'm busy right now — try again in ~") and busy.content.endswith(" s.")
            assert [server.count(f"/{i}.jpg") for i in range(cap + 1)] == [1] * cap + [0]

            # A user already at their cap: refused with the retry hint, and nothing downloaded.
            before = server.request_count
            with service.reserve("classify", cap, user=alice.id):
                await alice.send(channel, f"!classify {urls[0]}")
            assert channel.last_message.content.startswith("⚠️ I'm busy right now — try again in ~")
            assert server.request_count == before
            assert service.pending_for(alice.id) == 0
            assert env.errors == []


async def test_the_download_budget_holds_images_beyond_it_until_bytes_are_free():
    from bot.downloads import ByteBudget

    budget = ByteBudget(100)
    order: list[str] = []

    async def download(name: str, size: int, hold: asyncio.Event) -> None:
        async with budget.hold(size):
            order.append(f"start {name}")
            await hold.wait()
            order.append(f"end {name}")

    first, second, third = asyncio.Event(), asyncio.Event(), asyncio.Event()
    tasks = [
        asyncio.create_task(download("a", 60, first)),
        asyncio.create_task(download("b", 60, second)),  # does not fit beside a
        asyncio.create_task(download("c", 10, third)),  # fits, but waits its turn behind b
    ]
    await asyncio.sleep(0.01)
    assert order == ["start a"] and budget.in_use == 60
    first.set()
    await asyncio.sleep(0.01)
    assert order == ["start a", "end a", "start b", "start c"] and budget.in_use == 70
    second.set()
    third.set()
    await asyncio.gather(*tasks)
    assert budget.in_use == 0
    big = asyncio.create_task(download("huge", 10_000, asyncio.Event()))  # larger than the budget
    await asyncio.sleep(0.01)
    assert order[-1] == "start huge" and budget.in_use == 100  # gets the whole budget, in turn
    big.cancel()
    await asyncio.gather(big, return_exceptions=True)
    assert budget.in_use == 0


# --- shutdown in order ------------------------------------------------------------------------------------


def sessions_close_like_aiohttp(env) -> list[str]:
    """Record when the bot closes its HTTP session; requests after that fail like aiohttp's."""
    events: list[str] = []
    http = env.bot.http
    request, close = http.request, http.close

    async def closing() -> None:
        events.append("session closed")
        await close()

    async def requesting(route, **kwargs: Any) -> Any:
        if "session closed" in events:
            raise RuntimeError("Session is closed")
        events.append(f"{route.method} {route.path}")
        return await request(route, **kwargs)

    http.close = closing
    http.request = requesting
    return events


async def test_shutdown_lets_a_request_in_flight_answer_before_the_session_closes(service, horse_jpg):
    async with running_bot(service) as env:
        channel, alice = world(env)
        events = sessions_close_like_aiohttp(env)
        closing: list[asyncio.Future[None]] = []

        in_flight: list[int] = []

        async def shut_down_now(ctx, task: str) -> None:
            in_flight.append(env.bot.requests_in_flight)
            closing.append(asyncio.ensure_future(env.bot.close()))

        env.bot.add_listener(shut_down_now, "on_vision_request")
        await alice.send(channel, "!zebra", attachments=[("horse.jpg", horse_jpg)])
        await asyncio.gather(*closing)

        assert in_flight == [1]  # the bot began to stop while the request was in flight
        answer = channel.last_message
        assert answer.author.id == env.bot.user.id and answer.content.startswith("🦓") and answer.attachments
        assert events[-1] == "session closed"
        assert "POST /channels/{channel_id}/messages" in events[:-1]
        assert env.errors == []

        # Closed: a new command is not taken.
        await alice.send(channel, "!classify")
        assert channel.last_message.author.id == alice.id


async def test_shutdown_past_its_grace_says_it_is_restarting(service, horse_jpg):
    async with running_bot(service, shutdown_grace_s=0.0) as env:
        channel, alice = world(env)
        events = sessions_close_like_aiohttp(env)
        closing: list[asyncio.Future[None]] = []

        async def shut_down_now(ctx, task: str) -> None:
            closing.append(asyncio.ensure_future(env.bot.close()))

        env.bot.add_listener(shut_down_now, "on_vision_request")
        await alice.send(channel, "!zebra", attachments=[("horse.jpg", horse_jpg)])
        await asyncio.gather(*closing)

        assert channel.last_message.content == "⚠️ I'm restarting right now; try again in a minute."
        assert events[-1] == "session closed"
        assert env.errors == []


# --- interactions ----------------------------------------------------------------------------------------


async def test_an_error_after_a_public_defer_is_shown_to_its_user_only(service):
    with LocalHTTPServer() as server:
        url = server.serve("/notes.txt", b"just some text", content_type="text/plain")
        async with running_bot(service, url_fetcher=loopback_fetcher(service), allow_http_urls=True) as env:
            channel, alice = world(env)
            result = await alice.slash(channel, "caption", url=url)

            deferred = [r for r in env.http_requests if r.path.endswith("/callback") and isinstance(r.json, dict)]
            assert [r.json.get("type") for r in deferred] == [5]  # a public "thinking…"
            assert bot_messages(channel, env) == []  # nothing public is left in the channel
            (followup,) = result.followups
            assert followup.ephemeral and followup.content.startswith("⚠️")
            assert env.errors == []


# --- the channel gate -------------------------------------------------------------------------------------


async def test_threads_follow_their_parent_channel_and_dms_are_answered(service):
    async with running_bot(service) as env:
        guild = env.create_guild()
        allowed = guild.create_text_channel("bots")
        elsewhere = guild.create_text_channel("general")
        alice = guild.add_member(env.create_user("alice"))
        env.backend.create_thread(allowed.id, "bots thread", alice.id)
        env.backend.create_thread(elsewhere.id, "general thread", alice.id)
        env.bot.settings = env.bot.settings.replace(allowed_channels=frozenset({allowed.id}))
        (served,) = allowed.threads
        (refused,) = elsewhere.threads

        await alice.send(served, "!help")
        assert bot_messages(served, env) and bot_messages(served, env)[-1].embeds
        await alice.send(refused, "!help")
        assert bot_messages(refused, env) == []
        assert [type(unwrap(e)) for e in env.errors] == [ChannelNotAllowed]  # refused quietly

        await alice.send_dm("!help")  # a DM is nobody's server channel: answered
        dm = alice.user.dm_channel
        assert dm.last_message.author.id == env.bot.user.id and dm.last_message.embeds


async def test_a_context_menu_on_a_reply_answers_the_replied_image(service, bobby_jpg):
    async with running_bot(service) as env:
        channel, alice = world(env)
        bob = env.guild.add_member(env.create_user("bob"))
        photo = await bob.send(channel, "my dog", attachments=[("bobby.jpg", bobby_jpg)])
        words = await bob.send(channel, "look at him", reply_to=photo)

        result = await alice.context_menu(channel, "Classify image", words)
        assert top_label(result.response.embeds[0]) == "golden retriever"
        assert env.errors == []


async def test_a_context_menu_acknowledges_before_fetching_and_its_error_stays_private(service, bobby_jpg):
    async with running_bot(service) as env:
        channel, alice = world(env)
        bob = env.guild.add_member(env.create_user("bob"))
        photo = await bob.send(channel, "my dog", attachments=[("bobby.jpg", bobby_jpg)])
        words = await bob.send(channel, "look at him", reply_to=photo)
        await bob.delete(photo)  # the replied-to message is gone: the bot has to ask Discord

        result = await alice.context_menu(channel, "Classify image", words)

        calls = [(r.method, r.path) for r in env.http_requests]
        callback = next(i for i, (_, path) in enumerate(calls) if path.endswith("/callback"))
        fetches = [i for i, (method, path) in enumerate(calls) if method == "GET" and f"/messages/{photo.id}" in path]
        assert fetches and all(i > callback for i in fetches)  # acknowledged first, then fetched
        (followup,) = result.followups
        assert followup.ephemeral and "no image" in followup.content
        assert bot_messages(channel, env) == []  # nothing public left behind
        assert [type(unwrap(e)) for e in env.errors] == [NoImageFound]
