"""`/style` and `!style` through simcord: a style whose weights are present repaints the photo
with its own generator (the zebra worker loads it beside horse2zebra); one whose weights are
missing gets the one line that fetches them, before anything is queued; the names come from
the catalogue, in the autocomplete too.  `!zebra` is unchanged."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from bot.errors import unwrap
from config import Settings
from inference.service import InferenceService
from tests.checkpoints import write_cyclegan_checkpoint
from tests.test_bot import png_size, running_bot, world

pytestmark = pytest.mark.asyncio(loop_scope="module")

SIZE = 64


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def service(horse_jpg: bytes, tmp_path_factory) -> AsyncIterator[InferenceService]:
    """horse2zebra and style_monet on disk (different weights); no other style."""
    weights = tmp_path_factory.mktemp("styles")
    write_cyclegan_checkpoint(weights / "cyclegan" / "horse2zebra_0.4.0.pth", seed=1)
    write_cyclegan_checkpoint(weights / "cyclegan" / "style_monet.pth", seed=2)
    settings = Settings(
        weights_dir=weights, zebra_size=SIZE, heavy_command_cooldown_s=0, bot_data_dir=tmp_path_factory.mktemp("bot")
    )
    service = InferenceService(settings)
    await service.start()
    await service.zebra(horse_jpg)  # the worker started and its configured model loaded, outside any bot
    yield service
    await service.close()


async def test_a_style_with_its_weights_repaints_the_photo_with_its_own_model(service, horse_jpg):
    async with running_bot(service) as env:
        channel, alice = world(env)

        await alice.send(channel, "!zebra", attachments=[("horse.jpg", horse_jpg)])
        zebra = await channel.last_message.attachments[0].read()

        styled = await alice.slash(channel, "style", name="style_monet", image=("horse.jpg", horse_jpg))
        assert styled.response.content.startswith("🎨 horse.jpg, as `style_monet`")
        (file,) = styled.response.attachments
        monet = await file.read()
        assert min(png_size(monet)) == SIZE and monet != zebra  # another generator's picture

        await alice.send(channel, "!style monet", attachments=[("horse.jpg", horse_jpg)])  # the short name
        answer = channel.last_message
        assert answer.content.startswith("🎨 horse.jpg, as `style_monet`")
        assert await answer.attachments[0].read() == monet
        assert env.errors == []


async def test_a_style_without_its_weights_gets_the_command_that_fetches_them(service, horse_jpg):
    async with running_bot(service) as env:
        channel, alice = world(env)
        submitted = service.stats()["zebra"].submitted

        missing = await alice.slash(channel, "style", name="style_vangogh", image=("horse.jpg", horse_jpg))
        assert missing.ephemeral
        assert missing.response.content == (
            "⚠️ Missing weights for `style_vangogh`: run `python -m inference weights download style_vangogh`."
        )
        await alice.send(channel, "!style nowhere", attachments=[("horse.jpg", horse_jpg)])
        assert channel.last_message.content.startswith("⚠️ Unknown style `nowhere`: use `apple2orange`, ")
        assert service.stats()["zebra"].submitted == submitted  # nothing reached the queue
        # (Named: discord.py imports an extension's module afresh for each bot.)
        assert [type(unwrap(e)).__name__ for e in env.errors] == ["StyleWeightsMissing", "UnknownStyle"]


async def test_the_styles_are_the_catalogues_in_the_autocomplete(service):
    async with running_bot(service) as env:
        channel, alice = world(env)
        choices = await alice.autocomplete(channel, "style", "name", "monet")
        assert [choice["value"] for choice in choices] == ["monet2photo", "style_monet"]
        assert choices[1]["name"] == "style_monet — photo → Monet style"
        everything = await alice.autocomplete(channel, "style", "name", "")
        assert len(everything) == 18 and "zebra2horse" in [choice["value"] for choice in everything]
