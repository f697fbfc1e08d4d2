"""The bot's commands as a whole, through simcord: when they are synced with Discord, the
owner-only `sync`, the channel gate for every kind of command, the permission checks that run
before any download, and `models` from the bot's own service."""

from __future__ import annotations

import re

import discord
import pytest
import simcord
from discord import app_commands

from bot import create_bot
from bot.errors import ChannelNotAllowed, unwrap
from bot.urls import ImageFetcher
from config import Settings
from tests.httpserver import LocalHTTPServer
from tests.test_bot import SETTLE_TIMEOUT_S, bot_messages, running_bot, service, top_label, world  # noqa: F401

pytestmark = pytest.mark.asyncio(loop_scope="module")


def syncs(env: simcord.Env) -> int:
    """How many times the bot sent its global command tree to Discord."""
    return sum(1 for r in env.http_requests if r.method == "PUT" and r.path.endswith("/commands"))


# --- command sync -------------------------------------------------------------------------------


async def test_commands_are_synced_on_first_start_and_again_only_when_they_change(service, tmp_path):
    settings = service.settings.replace(bot_data_dir=tmp_path)
    bots = [create_bot(settings, service=service) for _ in range(3)]
    try:
        async with simcord.run(bots[0]) as env:
            channel, alice = world(env)
            assert syncs(env) == 1  # first start: synced
            assert {"classify", "zebra", "caption", "models", "help"} <= set(alice.available_commands(channel))

            await env.restart_bot(bots[1])  # the same commands: nothing to sync
            assert syncs(env) == 1

            @app_commands.command(name="ping", description="A command added since the last sync.")
            async def ping(interaction: discord.Interaction) -> None:
                await interaction.response.send_message("pong")

            bots[2].tree.add_command(ping)
            await env.restart_bot(bots[2])  # changed: synced by itself, no manual step
            assert syncs(env) == 2
            assert "ping" in alice.available_commands(channel)
    finally:
        for bot in bots:
            await bot.close()


async def test_only_the_owner_can_sync_by_hand(service):
    async with running_bot(service) as env:
        channel, alice = world(env)
        bob = env.guild.add_member(env.create_user("bob"))
        env.bot.owner_id = alice.id
        before = syncs(env)

        await bob.send(channel, "!sync")
        assert channel.last_message.content == "⚠️ Only the bot's owner can do that."
        assert syncs(env) == before

        await alice.send(channel, "!sync")
        assert channel.last_message.content.startswith("Synced ")
        assert syncs(env) == before + 1
        assert [type(unwrap(e)).__name__ for e in env.errors] == ["NotOwner"]


# --- the channel gate ---------------------------------------------------------------------------


async def test_the_channel_gate_refuses_prefix_slash_and_context_menus_alike(service, bobby_jpg):
    async with running_bot(service) as env:
        guild = env.create_guild()
        allowed = guild.create_text_channel("bots")
        elsewhere = guild.create_text_channel("general")
        alice = guild.add_member(env.create_user("alice"))
        photo = await alice.send(elsewhere, "my dog", attachments=[("bobby.jpg", bobby_jpg)])
        env.bot.settings = env.bot.settings.replace(allowed_channels=frozenset({allowed.id}))

        await alice.send(elsewhere, "!classify", attachments=[("bobby.jpg", bobby_jpg)])
        assert bot_messages(elsewhere, env) == []  # prefix: silent where it does not serve
        slash = await alice.slash(elsewhere, "classify", image=("bobby.jpg", bobby_jpg))
        menu = await alice.context_menu(elsewhere, "Classify image", photo)
        for refused in (slash, menu):
            assert refused.ephemeral and "don't answer commands in this channel" in refused.response.content
        assert [type(unwrap(e)) for e in env.errors] == [ChannelNotAllowed] * 3

        # A thread follows its parent, for interactions too.
        env.backend.create_thread(elsewhere.id, "general thread", alice.id)
        (thread,) = elsewhere.threads
        refused = await alice.slash(thread, "help")
        assert refused.ephemeral and "don't answer commands in this channel" in refused.response.content
        served = await alice.context_menu(allowed, "Classify image", await alice.send(allowed, "", attachments=[("bobby.jpg", bobby_jpg)]))
        assert top_label(served.response.embeds[0]) == "golden retriever"
        assert [type(unwrap(e)) for e in env.errors] == [ChannelNotAllowed] * 4


# --- permissions before heavy work ------------------------------------------------------------


async def test_a_missing_attach_files_permission_refuses_zebra_before_any_download(service, bobby_jpg):
    with LocalHTTPServer() as server:
        url = server.serve("/horse.jpg", bobby_jpg, content_type="image/jpeg")
        fetcher = ImageFetcher(service.settings.replace(allow_http_urls=True), allow_loopback_for_tests=True)
        async with running_bot(service, url_fetcher=fetcher, allow_http_urls=True) as env:
            guild = env.create_guild()
            alice = guild.add_member(env.create_user("alice"))
            no_files = guild.create_text_channel("no-files", overwrites={guild.me: discord.PermissionOverwrite(attach_files=False)})

            await alice.send(no_files, f"!zebra {url}")
            assert no_files.last_message.content == "⚠️ I'm missing a permission here: I need Attach Files."
            assert server.count("/horse.jpg") == 0  # refused before downloading
            assert [type(unwrap(e)).__name__ for e in env.errors] == ["BotMissingPermissions"]

            # Per task: classify needs no file, and answers there.
            await alice.send(no_files, f"!classify {url}")
            assert top_label(no_files.last_message.embeds[0]) == "golden retriever"
            # An interaction's answer may attach files whatever the channel says: /zebra works.
            slash = await alice.slash(no_files, "zebra", url=url)
            assert slash.response.attachments and slash.response.content.startswith("🦓")
            assert server.count("/horse.jpg") == 2


# --- models, from the bot's own service -----------------------------------------------------------


async def test_models_lists_missing_files_with_the_command_that_gets_them(tmp_path):
    # No service handed in: the bot builds its own (from these settings) in create_bot.
    bot = create_bot(Settings(weights_dir=tmp_path / "weights", bot_data_dir=tmp_path / "bot"))
    try:
        async with simcord.run(bot, settle_timeout=SETTLE_TIMEOUT_S) as env:
            channel, alice = world(env)
            await alice.send(channel, "!models")
            states = {f.name: f.value for f in channel.last_message.embeds[0].fields}
            assert "Missing: horse2zebra_0.4.0.pth" in states["zebra"]
            assert "`python -m inference weights download horse2zebra`" in states["zebra"]
            assert "— idle" in states["zebra"]
    finally:
        await bot.close()


# --- status ---------------------------------------------------------------------------------------


def shown_ms(milliseconds: float) -> str:
    return f"{milliseconds / 1000:.1f} s" if milliseconds >= 1000 else f"{milliseconds:.0f} ms"


async def test_status_shows_each_task_with_its_queue_and_times(service, bobby_jpg):
    from tests.test_bot_buttons import HeldModel, on_the_model

    async with running_bot(service) as env:
        channel, alice = world(env)
        with HeldModel(service, "classify"):
            ahead = await on_the_model(service, "classify", bobby_jpg)  # in the worker, not started
            result = await alice.slash(channel, "status")
        await ahead
        embed = result.response.embeds[0]
        fields = {f.name: f.value for f in embed.fields}
        assert list(fields) == ["classify", "zebra", "caption"]
        runtime = service.models()[0].runtime
        assert runtime in ("onnx", "torch")  # INFERENCE_RUNTIME=auto: whichever its export measured faster
        assert fields["classify"].startswith(f"🟢 loaded · `efficientnet_lite0` · {runtime} on cpu")
        # The held request, and the cores its batch was granted out of the service's budget.
        cores = service.stats().cpu_cores
        assert re.search(rf"waiting 1 · running 0 · [1-{cores}] of {cores} cores · p50 ", fields["classify"])
        assert "waiting 0 · running 0 · p50 " in fields["zebra"] and " · p95 " in fields["zebra"]
        caption = service.stats()["caption"]  # the figures are the service's own
        assert f"p50 {shown_ms(caption.p50_ms)} · p95 {shown_ms(caption.p95_ms)}" in fields["caption"]
        assert embed.footer.text.startswith(f"discord.py {discord.__version__} · Python 3.")

        await alice.send(channel, "!status")  # everyone may use it, in both forms
        assert [f.name for f in channel.last_message.embeds[0].fields] == ["classify", "zebra", "caption"]
        assert "waiting 0 · running 0" in channel.last_message.embeds[0].fields[0].value
        assert env.errors == []


async def test_status_names_missing_weights(tmp_path):
    bot = create_bot(Settings(weights_dir=tmp_path / "weights", bot_data_dir=tmp_path / "bot"))
    try:
        async with simcord.run(bot, settle_timeout=SETTLE_TIMEOUT_S) as env:
            channel, alice = world(env)
            await alice.send(channel, "!status")
            fields = {f.name: f.value for f in channel.last_message.embeds[0].fields}
            assert fields["zebra"].startswith("🔴 missing weights · `horse2zebra`")
            assert fields["classify"].startswith("⚪ idle · `efficientnet_lite0`")
            assert "no answers yet" in fields["classify"]
    finally:
        await bot.close()
