"""`inference.worker.decoding`: the byte semaphore a worker's decoder threads share, and the
decode-then-preprocess steps the worker and the Ray replica both use."""

from __future__ import annotations

import io
import threading
import weakref
from typing import Any

import pytest
from PIL import Image

from inference.errors import InferenceError
from inference.images import ImageLimits
from inference.worker.decoding import DecodeBudget, decode_held, prepare_one


class Recorder:
    """Counts the holders of a budget at once, and the most there ever were."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


def hold_many(budget: DecodeBudget, sizes: list[int]) -> Recorder:
    recorder = Recorder()
    start = threading.Barrier(len(sizes))

    def hold(size: int) -> None:
        start.wait()
        for _ in range(50):
            budget.acquire(size)
            recorder.enter()
            for _ in range(2000):  # a little work while holding, no sleeping
                pass
            recorder.leave()
            budget.release(size)

    threads = [threading.Thread(target=hold, args=(size,)) for size in sizes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert budget.held == 0
    return recorder


def test_two_that_do_not_fit_together_take_turns():
    assert hold_many(DecodeBudget(100), [60, 60, 60]).most == 1


def test_a_second_acquirer_waits_until_the_first_releases():
    budget = DecodeBudget(100)
    budget.acquire(60)
    got_in = threading.Event()
    waiter = threading.Thread(target=lambda: (budget.acquire(60), got_in.set()))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not got_in.is_set() and budget.held == 60
    budget.release(60)
    waiter.join(5)
    assert got_in.is_set() and budget.held == 60


def test_no_limit_never_waits():
    budget = DecodeBudget(0)
    budget.acquire(10**12)
    budget.acquire(10**12)  # would block forever if counted
    assert budget.held == 0


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "green").save(buffer, format="PNG")
    return buffer.getvalue()


class WatchedBudget(DecodeBudget):
    """Records, at each release, whether the image that held the share is gone."""

    def __init__(self, total_bytes: int) -> None:
        super().__init__(total_bytes)
        self.image: Any = None
        self.image_alive_at_release: list[bool] = []

    def release(self, size: int) -> None:
        self.image_alive_at_release.append(self.image is not None and self.image() is not None)
        super().release(size)


class Pipeline:
    draft_size = None

    def __init__(self, budget: WatchedBudget, fail: Exception | None = None) -> None:
        self.budget = budget
        self.fail = fail

    def preprocess(self, image: Image.Image) -> tuple[int, int]:
        self.budget.image = weakref.ref(image)
        if self.fail is not None:
            raise self.fail
        return image.size


def test_the_share_is_freed_after_the_full_size_image_is_dropped():
    budget = WatchedBudget(10 * 1024 * 1024)
    assert prepare_one(Pipeline(budget), png((64, 32)), ImageLimits(), budget, task="classify") == (64, 32)
    assert budget.image_alive_at_release == [False] and budget.held == 0


@pytest.mark.parametrize(
    ("fail", "message"),
    [
        (InferenceError("too odd"), "too odd"),
        (RuntimeError("boom"), "That image could not be prepared for the model."),
    ],
)
def test_a_preprocessing_error_frees_the_share_and_the_image(fail, message):
    budget = WatchedBudget(10 * 1024 * 1024)
    outcome = prepare_one(Pipeline(budget, fail), png((64, 32)), ImageLimits(), budget, task="classify")
    assert isinstance(outcome, InferenceError) and str(outcome) == message
    assert budget.image_alive_at_release == [False] and budget.held == 0


def test_an_undecodable_or_refused_image_holds_nothing():
    budget = DecodeBudget(10_000)
    buffer = io.BytesIO()
    Image.effect_noise((200, 200), 50).save(buffer, format="JPEG")
    broken = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    assert "truncated or corrupt" in str(decode_held(broken, ImageLimits(), budget, None, task="classify"))
    refused = decode_held(png((100, 100)), ImageLimits(max_decode_bytes=10_000), budget, None, task="classify")
    assert str(refused).startswith("That image would take about")
    assert budget.held == 0


_DECODE_IN_A_THREAD = """
import io, sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from PIL import Image
from inference.images import decode_image
from inference.runtime.needs import resident_bytes
if sys.argv[1] == "worker":  # a worker's (and a Ray replica's) shelf of models sets it up
    from config import Settings
    from inference.worker.models import ModelShelf
    from inference.worker.protocol import WorkerConfig
    ModelShelf(WorkerConfig.from_settings("classify", Settings(device="cpu")))
photos = []
for width, height in ((3000, 2000), (2500, 2500), (4000, 1500)):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8)).save(buffer, "PNG", compress_level=0)
    photos.append(buffer.getvalue())
decoders = ThreadPoolExecutor(2)
before = resident_bytes()
for data in photos * 2:
    decoders.submit(lambda data: decode_image(data).size, data).result()
print((resident_bytes() - before) // 2**20)
"""


def test_a_worker_gives_decoded_photos_back_to_the_system() -> None:
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    def kept_mb(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", _DECODE_IN_A_THREAD, mode], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True
        )
        return int(done.stdout.split()[-1])

    # glibc's defaults kept the freed 16 MB blocks of the photos in the decoder thread's heap.
    assert kept_mb("worker") < 10 <= kept_mb("defaults")
