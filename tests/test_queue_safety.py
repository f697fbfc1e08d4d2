"""The queue under one user's bad luck or bad intent: turns between users, a worker past its
memory ceiling, a model whose loading never ends.  Each test starts its own service (its own
settings), so each costs a worker start; the models are small or generated.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Awaitable
from pathlib import Path

import pytest
from PIL import Image

from config import Settings
from inference.errors import ModelUnavailable, WorkerCrashed
from inference.service import WATCHDOG_INTERVAL_S, InferenceService, Ticket
from tests.conftest import IMAGES

BASE = dict(device="cpu", cpu_cores=1, request_timeout_s=60.0)


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def small_horse() -> bytes:
    with Image.open(IMAGES / "horse.jpg") as image:
        return jpeg(image.resize((96, 64)))


@pytest.fixture(scope="module")
def small_dog() -> bytes:
    with Image.open(IMAGES / "bobby.jpg") as image:
        return jpeg(image.resize((160, 90)))


async def settle(awaitables: list[Awaitable[object]], timeout: float = 60.0) -> list[object]:
    return await asyncio.wait_for(asyncio.gather(*awaitables, return_exceptions=True), timeout)


async def wait_until(condition: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# --- turns between users ------------------------------------------------------------------------


@pytest.mark.parametrize("turns", [True, False], ids=["turns", "first-come"])
async def test_another_users_image_is_not_stuck_behind_six(
    generated_weights_dir: Path, small_horse: bytes, turns: bool
) -> None:
    settings = Settings(
        **BASE, weights_dir=generated_weights_dir, zebra_size=64, max_pending_per_user=6, queue_turns=turns
    )
    async with InferenceService(settings) as service:
        assert (await service.warm_up("zebra"))[0].state == "ready"
        alice = [service.submit("zebra", small_horse, user="alice") for _ in range(6)]
        # The worker takes one image at a time (zebra does not batch on the CPU) and holds at
        # most one more that it has not started: that one still counts as waiting.
        await wait_until(lambda: service.stats()["zebra"].dispatched == 2 and service.stats()["zebra"].running == 1)
        assert max(service.stats()["zebra"].batch_sizes, default=1) == 1
        assert [ticket.position() for ticket in alice[1:]] == [0, 1, 2, 3, 4]
        assert service.stats()["zebra"].waiting == 5

        bob = service.submit("zebra", small_horse, user="bob")
        promised = bob.position()
        finished: list[Ticket] = []

        async def record(ticket: Ticket) -> None:
            await ticket
            finished.append(ticket)

        await settle([record(ticket) for ticket in [*alice, bob]])
        # Its place: behind the running image and the one the worker holds, when users take
        # turns; else behind all six, and the placeholder says so.
        place = finished.index(bob)
        if turns:
            assert promised == 1 and place <= 2
        else:
            assert promised == 5 and place == 6
        assert promised == place - 1 - finished.index(alice[0])  # the one running is not "ahead"


# --- the memory ceiling -------------------------------------------------------------------------

HUB_MODELS = '''
"""Test-only Torch Hub entries: a classifier that hogs memory on a white image, and one whose
loading never ends."""
import threading
import time

import torch


class Hog(torch.nn.Module):
    def forward(self, x):
        if float(x.mean()) > 1.0:  # a white photo (ImageNet-normalised): hold 2 GB for a while
            block = torch.ones(512 * 1024 * 1024)
            time.sleep(30)
            del block
        return torch.zeros(x.shape[0], 1000)


def hog(pretrained=False, **kwargs):
    return Hog()


def stuck(pretrained=False, **kwargs):
    threading.Event().wait()  # a download or a lock that never comes back
'''


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hub")
    (directory / "hubconf.py").write_text(HUB_MODELS)
    return directory


async def test_a_worker_past_its_memory_ceiling_is_restarted_and_the_line_goes_on(
    hub_dir: Path, small_dog: bytes
) -> None:
    settings = Settings(
        **BASE, classifier=f"hub:{hub_dir}:hog", max_batch_size=1, classify_max_memory_mb=1200, max_pending_per_user=9
    )
    white = jpeg(Image.new("RGB", (64, 64), "white"))
    async with InferenceService(settings) as service:
        assert (await service.warm_up("classify"))[0].state == "ready"
        await asyncio.sleep(2 * WATCHDOG_INTERVAL_S)
        idle_mb = service.stats()["classify"].worker_memory_mb
        assert idle_mb is not None and idle_mb < 1200  # the ceiling leaves the model its room
        hog = service.submit("classify", white)
        held = service.submit("classify", small_dog)  # the second batch, in the worker
        waiting = [service.submit("classify", small_dog) for _ in range(2)]
        started = time.monotonic()
        results = await settle([hog, held, *waiting])
        for result in results[:2]:
            assert isinstance(result, WorkerCrashed), results
            assert "memory" in str(result) and "1200 MB" in str(result)
        for result in results[2:]:
            assert isinstance(result, list) and len(result) == 5, results  # answered by a fresh worker
        assert time.monotonic() - started < 25  # killed long before the hog's 30 s were up
        stats = service.stats()["classify"]
        assert stats.worker_crashes == 1 and stats.worker_starts == 2


# --- the loading deadline -----------------------------------------------------------------------


async def test_a_load_that_never_ends_fails_its_requests_and_the_next_one_starts_afresh(
    hub_dir: Path, small_dog: bytes
) -> None:
    name = f"hub:{hub_dir}:stuck"
    settings = Settings(**BASE, classifier=name, model_load_timeout_s=6.0, max_batch_size=1)
    async with InferenceService(settings) as service:
        started = time.monotonic()
        # Two batches go to the loading worker; the third request waits here: all three fail.
        tickets = [service.submit("classify", small_dog) for _ in range(3)]
        states, *outcomes = await settle([service.warm_up("classify"), *tickets], timeout=30)
        elapsed = time.monotonic() - started
        for outcome in outcomes:
            assert isinstance(outcome, ModelUnavailable), outcomes
            assert name in str(outcome) and "did not finish loading within 6 s" in str(outcome)
        assert 6.0 <= elapsed < 6.0 + 5.0
        assert states[0].state == "unavailable" and name in states[0].error  # warm_up returned
        first = service.stats()["classify"]
        assert first.worker_starts == 1 and first.worker_pid is None

        retry = service.submit("classify", small_dog)
        await wait_until(lambda: service.stats()["classify"].worker_starts == 2)
        assert {s.task: s for s in service.models()}["classify"].state == "loading"
        retry.cancel()
