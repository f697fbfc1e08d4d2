"""`/config` through simcord: set by a member with Manage Server, refused (privately) to the
others, applied to the next command (the channel gate, the cooldown, the images per message,
the classifier), and still in force after a restart: a new bot instance on the same database.

The service's configured classifier is the bundled EfficientNet-Lite0 through Torch Hub
(`hub:REPO:efficientnet_lite0`, this repository's hubconf): a second classifier that loads
offline, so that a server choosing `efficientnet_lite0` visibly changes the model that answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import discord
import pytest
import pytest_asyncio
import simcord
from discord.ext.commands import CommandOnCooldown

from bot import create_bot
from bot.errors import ChannelNotAllowed, unwrap
from config import Settings
from inference.service import InferenceService
from tests.conftest import REPO_ROOT
from tests.test_bot import SETTLE_TIMEOUT_S, bot_messages, top_label

pytestmark = pytest.mark.asyncio(loop_scope="module")

HUB_CLASSIFIER = f"hub:{REPO_ROOT}:efficientnet_lite0"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def service(generated_weights_dir: Path, bobby_jpg: bytes, tmp_path_factory) -> AsyncIterator[InferenceService]:
    settings = Settings(
        weights_dir=generated_weights_dir,
        classifier=HUB_CLASSIFIER,
        heavy_command_cooldown_s=0,
        zebra_size=64,  # the generator's cost grows with the pixels; a cooldown does not
        bot_data_dir=tmp_path_factory.mktemp("bot-data"),
    )
    service = InferenceService(settings)
    await service.start()
    await asyncio.gather(service.classify(bobby_jpg), service.zebra(bobby_jpg))  # models loaded, outside any bot
    yield service
    await service.close()


class Server:
    """One simcord guild: #general and #bots, an admin (Manage Server) and a member."""

    def __init__(self, env: simcord.Env) -> None:
        self.guild = env.create_guild()
        self.general = self.guild.create_text_channel("general")
        self.bots = self.guild.create_text_channel("bots")
        managers = self.guild.create_role("managers", permissions=discord.Permissions(manage_guild=True))
        self.admin = self.guild.add_member(env.create_user("admin"), roles=[managers])
        self.alice = self.guild.add_member(env.create_user("alice"))


def bot_settings(service: InferenceService, database: Path) -> Settings:
    return service.settings.replace(database_path=database, bot_data_dir=database.parent)


def best_guess(predictions) -> str:
    """The "Best guess" field of a classification embed, for these predictions."""
    return f"**{predictions[0].label}** ({predictions[0].probability:.1f} %)"


async def test_an_admin_sets_each_setting_and_the_next_command_follows_it(service, bobby_jpg, horse_jpg, tmp_path):
    # The two classifiers preprocess differently: their figures tell which one answered.
    by_hub = best_guess(await service.classify(bobby_jpg))
    by_lite = best_guess(await service.submit("classify", bobby_jpg, model="efficientnet_lite0"))
    assert by_hub != by_lite
    bot = create_bot(bot_settings(service, tmp_path / "servers.sqlite3"), service=service)
    try:
        async with simcord.run(bot, settle_timeout=SETTLE_TIMEOUT_S) as env:
            server = Server(env)
            shown = await server.admin.slash(server.general, "config")
            assert shown.ephemeral
            assert shown.response.content.count("(the bot's default)") == 4

            # The classifier: the configured one first, then the server's.
            await server.alice.send(server.general, "!classify", attachments=[("bobby.jpg", bobby_jpg)])
            assert server.general.last_message.embeds[0].footer.text == f"ImageNet classifier: {HUB_CLASSIFIER}"
            assert server.general.last_message.embeds[0].fields[0].value == by_hub
            chosen = await server.admin.slash(server.general, "config", setting="classifier", value="efficientnet_lite0")
            assert chosen.response.content.startswith("✅ **classifier**: `efficientnet_lite0` (this server's)")
            await server.alice.send(server.general, "!classify", attachments=[("bobby.jpg", bobby_jpg)])
            answer = server.general.last_message.embeds[0]
            assert answer.footer.text == "ImageNet classifier: efficientnet_lite0"
            assert top_label(answer) == "golden retriever" and answer.fields[0].value == by_lite

            # The images per message.
            await server.admin.send(server.general, "!config max_images 1")
            assert server.general.last_message.content.startswith("✅ **max_images**: 1 (this server's)")
            before = len(bot_messages(server.general, env))
            await server.alice.send(server.general, "!classify", attachments=[("a.jpg", bobby_jpg), ("b.jpg", bobby_jpg)])
            new = bot_messages(server.general, env)[before:]
            assert len([m for m in new if m.embeds]) == 1
            assert any("I answer up to 1 image per message; skipped: b.jpg" in m.content for m in new)

            # The cooldown of the heavy commands (the service's setting is none).
            await server.admin.slash(server.general, "config", setting="cooldown", value="60")
            await server.alice.send(server.general, "!zebra", attachments=[("horse.jpg", horse_jpg)])
            assert server.general.last_message.content.startswith("🦓")
            await server.alice.send(server.general, "!zebra", attachments=[("horse.jpg", horse_jpg)])
            assert server.general.last_message.content.startswith("⚠️ Easy there — you can use `zebra` again in ")

            # The channels: #bots only.  /config itself still works anywhere (to widen them again).
            await server.admin.slash(server.general, "config", setting="channels", value=server.bots.mention)
            before = len(bot_messages(server.general, env))
            await server.alice.send(server.general, "!classify", attachments=[("bobby.jpg", bobby_jpg)])
            assert len(bot_messages(server.general, env)) == before  # silent where it does not serve
            refused = await server.alice.slash(server.general, "classify", image=("bobby.jpg", bobby_jpg))
            assert refused.ephemeral and "don't answer commands in this channel" in refused.response.content
            await server.alice.send(server.bots, "!classify", attachments=[("bobby.jpg", bobby_jpg)])
            assert top_label(server.bots.last_message.embeds[0]) == "golden retriever"
            widened = await server.admin.slash(server.general, "config", setting="channels", value="all")
            assert widened.response.content.startswith("✅ **channels**: all channels (this server's)")
            refusals = [CommandOnCooldown, ChannelNotAllowed, ChannelNotAllowed]
            assert [type(unwrap(e)) for e in env.errors] == refusals
    finally:
        await bot.close()


async def test_a_member_without_manage_server_may_look_but_not_change(service, tmp_path):
    bot = create_bot(bot_settings(service, tmp_path / "servers.sqlite3"), service=service)
    try:
        async with simcord.run(bot, settle_timeout=SETTLE_TIMEOUT_S) as env:
            server = Server(env)
            refused = await server.alice.slash(server.general, "config", setting="cooldown", value="0")
            assert refused.ephemeral
            assert refused.response.content == "⚠️ Only members with the Manage Server permission can change this server's settings."
            looked = await server.alice.slash(server.general, "config", setting="cooldown")
            assert looked.ephemeral and looked.response.content.startswith("**cooldown**: 0 s (the bot's default)")
            assert bot.guild_configs is not None and bot.guild_configs.get(server.guild.id).cooldown is None
            assert env.errors == []
    finally:
        await bot.close()


async def test_bad_names_and_values_get_one_private_line(service, tmp_path):
    bot = create_bot(bot_settings(service, tmp_path / "servers.sqlite3"), service=service)
    try:
        async with simcord.run(bot, settle_timeout=SETTLE_TIMEOUT_S) as env:
            server = Server(env)
            other = env.create_guild("elsewhere").create_text_channel("theirs")
            for setting, value, line in [
                ("colour", "blue", "⚠️ Unknown setting `colour`: use `channels`, `cooldown`, `max_images`, `classifier`."),
                ("max_images", "50", "⚠️ `max_images` takes a whole number from 1 to 10, not `50`."),
                ("channels", other.mention, f"⚠️ Unknown channel {other.id}: name channels of this server."),
                ("classifier", "resnet9000", "⚠️ Unknown classifier `resnet9000`: use "),
            ]:
                result = await server.admin.slash(server.general, "config", setting=setting, value=value)
                assert result.ephemeral and result.response.content.startswith(line), result.response.content
            suggested = await server.admin.autocomplete(server.general, "config", "value", "eff", setting="classifier")
            assert [choice["value"] for choice in suggested] == ["efficientnet_lite0", HUB_CLASSIFIER]
            assert bot.guild_configs is not None and bot.guild_configs.get(server.guild.id).value("max_images") is None
            assert env.errors == []
    finally:
        await bot.close()


async def test_the_settings_are_still_in_force_after_a_restart(service, bobby_jpg, tmp_path):
    database = tmp_path / "servers.sqlite3"
    first, second = (create_bot(bot_settings(service, database), service=service) for _ in range(2))
    try:
        async with simcord.run(first, settle_timeout=SETTLE_TIMEOUT_S) as env:
            server = Server(env)
            await server.admin.slash(server.general, "config", setting="channels", value=f"{server.bots.id}")
            await server.admin.slash(server.general, "config", setting="max_images", value="2")
            assert database.is_file()

            await env.restart_bot(second)  # a new bot instance, the same database file
            assert second.guild_configs is not None and second.guild_configs is not first.guild_configs
            shown = await server.alice.slash(server.general, "config")
            assert f"**channels**: <#{server.bots.id}> (this server's)" in shown.response.content
            assert "**max_images**: 2 (this server's)" in shown.response.content
            refused = await server.alice.slash(server.general, "classify", image=("bobby.jpg", bobby_jpg))
            assert refused.ephemeral and "don't answer commands in this channel" in refused.response.content
            photos = [(f"{i}.jpg", bobby_jpg) for i in range(3)]
            await server.alice.send(server.bots, "!classify", attachments=photos)
            assert len([m for m in bot_messages(server.bots, env) if m.embeds]) == 2
            assert [type(unwrap(e)) for e in env.errors] == [ChannelNotAllowed]
    finally:
        await first.close()
        await second.close()
