"""The worker process's loop, run in this process over a real pipe, with a stand-in model.

What runs here is `inference.worker.process` as the child runs it (reader thread, decoding,
batching into the model, the messages back); only the model is a fake, so each test takes
milliseconds and can count exactly what reached the model.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from multiprocessing import Pipe
from typing import Any

import pytest
import torch
from PIL import Image

from config import Settings
from inference.errors import InvalidImage
from inference.worker.decoding import DecodeBudget
from inference.worker.process import _Worker
from inference.worker.protocol import (
    Batch,
    Cancel,
    Results,
    Started,
    Stop,
    WorkerConfig,
    WorkItem,
    frames,
)


class FakePipeline:
    name = "fake"
    draft_size = None
    fixed_input_size = True

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return torch.zeros(3, 4, 4)

    def run(self, inputs: list[torch.Tensor], options: list[dict[str, Any]]) -> list[Any]:
        self.seen.extend(option["tag"] for option in options)
        return [f"answer {option['tag']}" for option in options]


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "green").save(buffer, format="PNG")
    return buffer.getvalue()


class RunningWorker:
    """A `_Worker` serving on a thread; `send` writes to its pipe as the parent's writer does."""

    def __init__(self, config: WorkerConfig) -> None:
        self.parent, child = Pipe(duplex=True)
        self.worker = _Worker(config, child)
        self.pipeline = FakePipeline()
        self.worker.pipeline = self.pipeline  # loaded already: no model files needed
        self.thread = threading.Thread(target=self.worker.serve, daemon=True)
        self.thread.start()

    def send(self, message: Any) -> None:
        for frame in frames(message):
            self.parent.send_bytes(frame)

    def results_of(self, batch_id: int) -> Iterator[Any]:
        """The messages about one batch, up to its final `Results`."""
        while True:
            assert self.parent.poll(10), "the worker did not answer"
            message = self.parent.recv()
            yield message
            if isinstance(message, Results) and message.batch_id == batch_id and message.final:
                return

    def stop(self) -> None:
        self.send(Stop())
        self.thread.join(5)
        self.parent.close()


@pytest.fixture()
def worker_for() -> Iterator[Any]:
    running: list[RunningWorker] = []

    def start(**changes: Any) -> RunningWorker:
        settings = Settings(**{"device": "cpu", "cpu_cores": 1, **changes})
        running.append(RunningWorker(WorkerConfig.from_settings("classify", settings)))
        return running[-1]

    yield start
    for worker in running:
        worker.stop()


def outcomes(messages: list[Any]) -> dict[int, Any]:
    return {o.request_id: o.error or o.value for m in messages if isinstance(m, Results) for o in m.outcomes}


def test_a_batch_is_decoded_run_and_answered(worker_for: Any) -> None:
    worker = worker_for()
    worker.send(Batch(1, [WorkItem(i, png((32, 32)), {"tag": i}) for i in (1, 2, 3)]))
    messages = list(worker.results_of(1))
    assert messages[0] == Started(1)
    assert outcomes(messages) == {1: "answer 1", 2: "answer 2", 3: "answer 3"}
    final = messages[-1]
    assert final.skipped == 0 and sum(m.model_batch for m in messages if isinstance(m, Results)) == 3


def test_a_cancelled_request_is_skipped_and_never_reaches_the_model(worker_for: Any) -> None:
    worker = worker_for()
    worker.send(Cancel([2]))  # the caller went away while its request was on the way
    worker.send(Batch(1, [WorkItem(i, png((32, 32)), {"tag": i}) for i in (1, 2, 3)]))
    messages = list(worker.results_of(1))
    assert outcomes(messages) == {1: "answer 1", 3: "answer 3"}
    assert messages[-1].skipped == 1
    assert worker.pipeline.seen == [1, 3]


def test_the_image_limits_come_from_the_settings(worker_for: Any) -> None:
    image = png((64, 64))  # 4,096 pixels
    strict = worker_for(max_image_pixels=1_000)
    strict.send(Batch(1, [WorkItem(1, image, {"tag": 1})]))
    [refused] = outcomes(list(strict.results_of(1))).values()
    assert isinstance(refused, InvalidImage)
    assert strict.pipeline.seen == []

    lenient = worker_for(max_image_pixels=10_000)
    lenient.send(Batch(1, [WorkItem(1, image, {"tag": 1})]))
    assert outcomes(list(lenient.results_of(1))) == {1: "answer 1"}


def test_one_undecodable_image_fails_alone(worker_for: Any) -> None:
    worker = worker_for()
    worker.send(Batch(1, [WorkItem(1, b"not an image", {"tag": 1}), WorkItem(2, png((8, 8)), {"tag": 2})]))
    results = outcomes(list(worker.results_of(1)))
    assert isinstance(results[1], InvalidImage) and results[2] == "answer 2"


class PeakBudget(DecodeBudget):
    """A decode budget that remembers the most it ever held."""

    def __init__(self, total_bytes: int) -> None:
        super().__init__(total_bytes)
        self.peak = 0

    def acquire(self, size: int) -> None:
        super().acquire(size)
        self.peak = max(self.peak, self.held)


def test_an_image_over_the_decode_budget_fails_alone(worker_for: Any) -> None:
    worker = worker_for(decode_memory_mb=1, cpu_cores=4)  # an RGB image: 4 bytes a pixel
    big, small = png((600, 600)), png((300, 300))  # 1.4 MB and 0.34 MB decoded
    worker.send(Batch(1, [WorkItem(1, small, {"tag": 1}), WorkItem(2, big, {"tag": 2}), WorkItem(3, small, {"tag": 3})]))
    results = outcomes(list(worker.results_of(1)))
    assert results[1] == "answer 1" and results[3] == "answer 3"
    assert isinstance(results[2], InvalidImage) and str(results[2]) == (
        "That image would take about 1.4 MB of memory to decode; this bot decodes at most 1.0 MB at a time "
        "(a JPEG, or a smaller image, will do)."
    )
    assert worker.pipeline.seen == [1, 3]


def test_images_that_fit_the_budget_one_by_one_but_not_together_all_decode(worker_for: Any) -> None:
    worker = worker_for(decode_memory_mb=1, cpu_cores=4)
    budget = worker.worker.decode_budget = PeakBudget(worker.worker.decode_budget.total_bytes)
    # 1.0 MB first, then 0.64 MB each: no two fit together, and the first may wait for any other.
    images = [png((500, 500))] + [png((400, 400))] * 7
    for batch_id in (1, 2, 3):
        worker.send(Batch(batch_id, [WorkItem(i, image, {"tag": i}) for i, image in enumerate(images)]))
        assert outcomes(list(worker.results_of(batch_id))) == {i: f"answer {i}" for i in range(8)}
    assert budget.peak <= 1024 * 1024 and budget.held == 0
    assert worker.pipeline.seen == list(range(8)) * 3  # the batch's order, however they finished
