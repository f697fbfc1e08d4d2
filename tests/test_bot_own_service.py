"""A bot that builds its own inference service (`create_bot` without `service=`) answers its very
first command, through simcord, with nothing submitted beforehand (issue 8, point 6).

What used to go wrong: the service queued a request *in the caller's context*.  Its dispatcher
task (`background_task` passes a fresh `Context`, but a loop's task hook may still decide from
the current one — simcord's does), its expiry timer and its clock readings then belonged to the
command: under simcord, to the bot's virtual clock and its pending work.  The batch window then
waited on virtual time, which only moves once the bot settles, which it could not do before the
batch went out.  The service now sets a request up in a context of its own, and a task's
dispatcher runs only while requests wait.
"""

from __future__ import annotations

import asyncio

import pytest
import simcord

from bot import create_bot
from config import Settings
from tests.test_bot import SETTLE_TIMEOUT_S, top_label, world

pytestmark = pytest.mark.asyncio(loop_scope="module")


def dispatchers() -> list[str]:
    """The service's dispatcher tasks alive now (named `inference-<task>-dispatch`)."""
    return [task.get_name() for task in asyncio.all_tasks() if task.get_name().endswith("-dispatch")]


async def no_dispatcher_left() -> bool:
    for _ in range(200):
        if not dispatchers():
            return True
        await asyncio.sleep(0.01)
    return False


async def test_a_bot_with_its_own_service_answers_its_first_command(generated_weights_dir, bobby_jpg, tmp_path):
    settings = Settings(weights_dir=generated_weights_dir, bot_data_dir=tmp_path, heavy_command_cooldown_s=0)
    bot = create_bot(settings)
    try:
        async with simcord.run(bot, settle_timeout=SETTLE_TIMEOUT_S) as env:
            channel, alice = world(env)
            assert bot.service.models()[0].state == "idle" and dispatchers() == []

            await alice.send(channel, "!classify", attachments=[("bobby.jpg", bobby_jpg)])  # the first request

            assert top_label(channel.last_message.embeds[0]) == "golden retriever"
            stats = bot.service.stats()["classify"]
            assert stats.done == 1 and stats.timed_out == 0
            # Latencies are real seconds, on the service's own clock (not the test world's).
            assert 0 < stats.p50_ms < SETTLE_TIMEOUT_S * 1000
            assert await no_dispatcher_left()  # nothing waits: no dispatcher

            # The next one starts a dispatcher again, and it goes again once the line is empty.
            await alice.send(channel, "!classify", attachments=[("bobby.jpg", bobby_jpg)])
            assert top_label(channel.last_message.embeds[0]) == "golden retriever"
            assert bot.service.stats()["classify"].done == 2
            assert await no_dispatcher_left()
            assert env.errors == []
    finally:
        await bot.close()
