"""The Ray backend's own ways (`INFERENCE_BACKEND=ray`); the contract every backend keeps is
`test_backend_contract.py`'s, which runs against it too.

- The bot, built by `create_bot` from settings alone, starts a local Ray instance of its own,
  answers `!classify`, `!zebra` and `!caption` (generated checkpoints) through the Serve
  deployments, and stops Ray when it closes.
- Then one local Ray instance for the rest of the module (Ray takes seconds to start): Serve's
  back-pressure comes back as `Busy`, a bad image as the same `InvalidImage` as locally.
- What needs no Ray running: the factory, the deployments' options, sharding.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import discord
import pytest
import pytest_asyncio
import ray
import simcord
from ray import serve
from discord.ext import commands
from PIL import Image

from bot import create_bot
from config import Settings
from inference.errors import Busy, InvalidImage, ServiceClosed
from inference.service import InferenceService
from inference.service.factory import create_service
from inference.service.ray_app import deployment_options, replica_arguments
from inference.service.ray_backend import RayBackend
from tests.conftest import REPO_ROOT, assert_dog

#: The Ray tests share one local Ray instance (module scope), so they share the module's loop.
in_the_modules_loop = pytest.mark.asyncio(loop_scope="module")

SETTLE_TIMEOUT_S = 120.0  # starting Ray and loading three models, on two shared cores

SMALL = dict(device="cpu", cpu_cores=1, max_batch_size=2, max_batch_wait_ms=20.0, heavy_command_cooldown_s=0)


def small_jpeg(data: bytes, size: tuple[int, int] = (320, 240)) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        buffer = io.BytesIO()
        image.convert("RGB").resize(size).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()


def world(env: simcord.Env) -> tuple[simcord.ChannelHandle, simcord.MemberActor]:
    channel = env.create_guild().create_text_channel("general")
    alice = env.guild.add_member(env.create_user("alice"))
    return channel, alice


# --- the bot on a Ray instance of its own (first: no Ray may be running yet) ----------------------


@in_the_modules_loop
async def test_the_bot_serves_every_task_through_serve_and_stops_its_ray(
    generated_weights_dir: Path, bobby_jpg: bytes, horse_jpg: bytes, tmp_path: Path
) -> None:
    assert not ray.is_initialized()
    settings = Settings(inference_backend="ray", weights_dir=generated_weights_dir, bot_data_dir=tmp_path, **SMALL)
    bot = create_bot(settings)
    assert isinstance(bot.service, RayBackend)
    try:
        async with simcord.run(bot, settle_timeout=SETTLE_TIMEOUT_S) as env:
            channel, alice = world(env)
            assert ray.is_initialized() and bot.service.owns_ray  # started in `setup_hook`
            # The models load from the test, not from a command (test_bot.py's reasons): a
            # replica's first load on two busy cores is no command's wait.
            states = await bot.service.warm_up()
            assert [state.state for state in states] == ["ready", "ready", "ready"], states
            await alice.send(channel, "!classify", attachments=[("bobby.jpg", small_jpeg(bobby_jpg))])
            answer = channel.last_message
            assert answer.author.id == env.bot.user.id
            assert "golden retriever" in answer.embeds[0].fields[0].value

            await alice.send(channel, "!zebra", attachments=[("horse.jpg", small_jpeg(horse_jpg, (400, 300)))])
            zebra = channel.last_message
            assert zebra.content.startswith("🦓")
            (file,) = zebra.attachments
            with Image.open(io.BytesIO(await file.read())) as image:
                assert image.format == "PNG" and min(image.size) == settings.zebra_size

            await alice.send(channel, "!caption", attachments=[("horse.jpg", small_jpeg(horse_jpg))])
            caption = channel.last_message.content
            assert caption.startswith("📝 horse.jpg: ") and len(caption.split()) > 3
            assert env.errors == []

            stats = bot.service.stats()
            assert [stats[task].ran for task in ("classify", "zebra", "caption")] == [1, 1, 1]
            assert {state.task: state.state for state in bot.service.models()} == {
                "classify": "ready",
                "zebra": "ready",
                "caption": "ready",
            }
    finally:
        await bot.close()  # also when an assertion failed: no Ray left running
    assert not ray.is_initialized()  # the bot's service stopped the Ray instance it started
    with pytest.raises(ServiceClosed):
        bot.service.submit("classify", bobby_jpg)


# --- one Ray instance for the rest of the module --------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def deployed(generated_weights_dir: Path) -> AsyncIterator[RayBackend]:
    """A backend that starts Ray and deploys the application with small queues: Serve holds at
    most 2 × 2 requests on the classify replica and queues 2 more per caller."""
    settings = Settings(weights_dir=generated_weights_dir, classify_queue_size=2, **SMALL)
    async with RayBackend(settings) as backend:
        assert backend.owns_ray
        await backend.warm_up("classify")
        yield backend
    assert not ray.is_initialized()


@in_the_modules_loop
async def test_serve_back_pressure_is_busy_with_a_retry_hint(deployed: RayBackend, bobby_jpg: bytes) -> None:
    # Another bot process's view: its own queue limit is large, the deployed app's is not, and
    # it uses the application as deployed (it does not deploy its own).
    dog = small_jpeg(bobby_jpg)
    async with RayBackend(deployed.settings.replace(classify_queue_size=64)) as greedy:
        assert not greedy.owns_ray
        tickets = [greedy.submit("classify", dog) for _ in range(24)]
        results = await asyncio.wait_for(asyncio.gather(*tickets, return_exceptions=True), 120)
        answered = [r for r in results if isinstance(r, list)]
        refused = [r for r in results if isinstance(r, Busy)]
        assert len(answered) + len(refused) == 24, results
        # The replica holds at most 4, Serve queues at most 2 for this caller (how many of those
        # it took depends on when each request was assigned): Serve refused the rest.
        assert 0 < len(answered) <= 6 and refused
        assert all("busy" in str(busy) and 0 < busy.retry_after <= 60 for busy in refused)
        for result in answered:
            assert_dog(result)
        stats = greedy.stats()["classify"]
        assert (stats.rejected, stats.done, stats.waiting, stats.running) == (len(refused), len(answered), 0, 0)


@in_the_modules_loop
async def test_errors_come_back_as_their_own_types(deployed: RayBackend, bobby_jpg: bytes) -> None:
    before = deployed.stats()["classify"]
    with pytest.raises(InvalidImage):
        await deployed.submit("classify", b"GIF89a not really")
    good, bad = deployed.submit("classify", small_jpeg(bobby_jpg)), deployed.submit("classify", b"\xff\xd8\xff junk")
    assert_dog(await good)  # a bad image in the same batch fails only its own request
    with pytest.raises(InvalidImage):
        await bad
    after = deployed.stats()["classify"]
    assert (after.failed - before.failed, after.done - before.done) == (2, 1)


@in_the_modules_loop
async def test_cancelling_cancels_the_serve_request(deployed: RayBackend, bobby_jpg: bytes) -> None:
    replica = serve.get_deployment_handle("classify", app_name=deployed.app_name).options(method_name="model_runs")
    runs_before = await replica.remote()
    dog = small_jpeg(bobby_jpg)
    # Room on this side for all five (the deployed app takes 4 + 2 per caller).
    async with RayBackend(deployed.settings.replace(classify_queue_size=16)) as backend:
        keep = [backend.submit("classify", dog) for _ in range(2)]
        dropped = [backend.submit("classify", dog) for _ in range(3)]
        for ticket in dropped:
            ticket.cancel()
        for result in await asyncio.gather(*keep):
            assert_dog(result)
        # One more, sent after them: had the dropped ones gone on in Serve, they ran before it.
        assert_dog(await backend.submit("classify", dog))
        assert await replica.remote() - runs_before == 3  # the model never saw the cancelled ones
        stats = backend.stats()["classify"]
        assert (stats.cancelled, stats.ran, stats.done) == (3, 3, 3)


# --- no Ray needed ----------------------------------------------------------------------------------


def test_the_factory_picks_the_backend_from_the_settings() -> None:
    assert isinstance(create_service(Settings()), InferenceService)
    assert isinstance(create_service(Settings(inference_backend="ray")), RayBackend)


def test_the_local_backend_never_imports_ray_and_the_ray_client_never_imports_torch() -> None:
    script = (
        "import sys; from config import Settings; from inference.service import create_service; import bot.client; "
        "create_service(Settings()); print('ray' in sys.modules, end=' '); "
        "create_service(Settings(inference_backend='ray')); print('ray' in sys.modules, 'torch' in sys.modules)"
    )
    found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert found.stdout.split() == ["False", "True", "False"]


def test_deployments_take_their_batching_replicas_and_gpu_from_the_settings() -> None:
    settings = Settings(max_batch_size=8, max_batch_wait_ms=5.0, classify_queue_size=40, cpu_cores=2)
    cpu = deployment_options(settings, "classify", gpu=False)
    assert (cpu["name"], cpu["max_ongoing_requests"], cpu["max_queued_requests"], cpu["num_replicas"]) == (
        "classify",
        16,
        40,
        1,
    )
    assert cpu["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0}
    config, batch, wait_s = replica_arguments(settings, "classify", gpu=False)
    assert (config.task, config.device, batch, wait_s) == ("classify", "auto", 8, 0.005)
    # The zebra task batches on a GPU only; a GPU replica asks for one and runs on CUDA.
    assert replica_arguments(settings, "zebra", gpu=False)[1] == 1
    config, batch, _ = replica_arguments(settings, "zebra", gpu=True)
    assert (config.device, batch) == ("cuda", 8)
    gpu = deployment_options(settings.replace(ray_min_replicas=1, ray_max_replicas=4), "zebra", gpu=True)
    assert gpu["ray_actor_options"]["num_gpus"] == 1 and "num_replicas" not in gpu
    assert gpu["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    assert settings.discord_token is None or "discord_token" not in config.__dict__  # never sent to a replica


@in_the_modules_loop
async def test_shard_settings_reach_discord_py(tmp_path: Path) -> None:
    plain = create_bot(Settings(bot_data_dir=tmp_path))
    assert not isinstance(plain, commands.AutoShardedBot)
    await plain.close()
    for settings, shards in (
        (Settings(bot_data_dir=tmp_path, shard_count=4, shard_ids=frozenset({3, 1})), [1, 3]),
        (Settings(bot_data_dir=tmp_path, shard_count=2), [0, 1]),  # no SHARD_IDS: all of them
    ):
        bot = create_bot(settings)
        assert isinstance(bot, commands.AutoShardedBot) and isinstance(bot, discord.AutoShardedClient)
        try:
            async with simcord.run(bot, settle_timeout=SETTLE_TIMEOUT_S) as env:
                # discord.py runs the shards it was given: these and no others.
                assert (bot.shard_count, sorted(bot.shards)) == (settings.shard_count, shards)
                channel, alice = world(env)
                await alice.send(channel, "!help")
                # A guild's events go to shard (guild id >> 22) % SHARD_COUNT: the bot answers a
                # guild of its shards, and leaves the others to the bot processes that run theirs.
                runs_its_shard = (env.guild.id >> 22) % settings.shard_count in shards
                answered = channel.last_message.author.id == env.bot.user.id
                assert answered == runs_its_shard
                assert env.errors == []
        finally:
            await bot.close()

