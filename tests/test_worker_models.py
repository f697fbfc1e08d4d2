"""One worker, several models: a request names its model (`model`, a zebra style), the worker
loads it beside the configured one, runs each batch model by model and keeps at most
`MAX_LOADED_MODELS` loaded.

The real `_Worker` over a real pipe, with real CycleGAN generators built from generated
checkpoints of three styles (different seeds: different weights, so different pictures).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from multiprocessing import Pipe
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from config import Settings
from inference.errors import InferenceError
from inference.worker.models import MAX_LOADED_MODELS
from inference.worker.process import _Worker
from inference.worker.protocol import Batch, Results, StateChanged, Stop, WorkerConfig, WorkItem, frames
from tests.checkpoints import write_cyclegan_checkpoint

#: Small pictures: the generator's cost grows with the pixels, and a style shows at any size.
SIZE = 32


def photo() -> bytes:
    image = Image.new("RGB", (48, 40))
    image.putdata([(x * 5 % 256, y * 6 % 256, (x * y) % 256) for y in range(40) for x in range(48)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def styles_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """horse2zebra (the configured model) and two zoo styles; zebra2horse is missing."""
    weights = tmp_path_factory.mktemp("styles")
    write_cyclegan_checkpoint(weights / "cyclegan" / "horse2zebra_0.4.0.pth", seed=1)
    write_cyclegan_checkpoint(weights / "cyclegan" / "style_monet.pth", seed=2)
    write_cyclegan_checkpoint(weights / "cyclegan" / "style_vangogh.pth", seed=3, stale_norm_stats=True)
    return weights


class ZebraWorker:
    """A real zebra `_Worker` serving on a thread, over a pipe, as the child process runs it."""

    def __init__(self, weights_dir: Path) -> None:
        settings = Settings(device="cpu", weights_dir=weights_dir, zebra_size=SIZE)
        self.parent, child = Pipe(duplex=True)
        self.worker = _Worker(WorkerConfig.from_settings("zebra", settings), child)
        self.thread = threading.Thread(target=self.worker.serve, daemon=True)
        self.thread.start()
        self.batches = 0
        self.states: list[StateChanged] = []

    def run(self, *models: str | None) -> dict[int, Any]:
        """One batch, one request per entry of `models` (None: no `model` option); the outcomes."""
        self.batches += 1
        items = [WorkItem(i, photo(), {} if model is None else {"model": model}) for i, model in enumerate(models)]
        for frame in frames(Batch(self.batches, items)):
            self.parent.send_bytes(frame)
        found: dict[int, Any] = {}
        while True:
            assert self.parent.poll(60), "the worker did not answer"
            message = self.parent.recv()
            if isinstance(message, StateChanged):
                self.states.append(message)
            if isinstance(message, Results):
                found.update({o.request_id: o.error or o.value for o in message.outcomes})
                if message.final and message.batch_id == self.batches:
                    return found

    def stop(self) -> None:
        for frame in frames(Stop()):
            self.parent.send_bytes(frame)
        self.thread.join(10)
        self.parent.close()


@pytest.fixture()
def zebra_worker(styles_dir: Path) -> Iterator[ZebraWorker]:
    worker = ZebraWorker(styles_dir)
    yield worker
    worker.stop()


def test_requests_of_two_styles_in_one_batch_each_get_their_own_model(zebra_worker: ZebraWorker) -> None:
    answers = zebra_worker.run(None, "style_monet", "horse2zebra", "style_monet")
    assert all(isinstance(value, bytes) and value.startswith(b"\x89PNG") for value in answers.values())
    # The configured model, named or not, gives one picture; the other style another.
    assert answers[0] == answers[2]
    assert answers[1] == answers[3]
    assert answers[0] != answers[1]
    assert list(zebra_worker.worker.pipelines) == ["horse2zebra", "style_monet"]  # each loaded once
    # The task's state keeps naming its configured model: a style beside it does not rename it.
    assert [s.model for s in zebra_worker.states if s.state == "ready"] == ["horse2zebra", ""]


def test_at_most_two_models_stay_loaded_the_least_recently_used_going_first(zebra_worker: ZebraWorker) -> None:
    assert MAX_LOADED_MODELS == 2
    first = zebra_worker.run("style_monet")[0]
    zebra_worker.run(None)  # horse2zebra: two loaded
    zebra_worker.run("style_monet")  # used again: horse2zebra is now the oldest
    vangogh = zebra_worker.run("style_vangogh")[0]
    assert list(zebra_worker.worker.pipelines) == ["style_monet", "style_vangogh"]
    zebra_worker.run(None)  # back: style_monet goes
    assert list(zebra_worker.worker.pipelines) == ["style_vangogh", "horse2zebra"]
    # A model loaded again answers as before.
    assert zebra_worker.run("style_monet")[0] == first
    assert vangogh != first
    loads = [s for s in zebra_worker.states if s.state == "loading"]
    assert len(loads) == 5  # monet, horse2zebra, vangogh, horse2zebra again, monet again


def test_a_style_that_cannot_load_fails_only_its_requests(zebra_worker: ZebraWorker) -> None:
    answers = zebra_worker.run("zebra2horse", None)  # zebra2horse's weights are not there
    assert isinstance(answers[0], InferenceError) and "zebra2horse" in str(answers[0])
    assert isinstance(answers[1], bytes)
    # The task is not unavailable: its configured model answers.
    failed = [s for s in zebra_worker.states if s.error]
    assert failed and all(s.state != "unavailable" for s in failed)
    assert list(zebra_worker.worker.pipelines) == ["horse2zebra"]


async def test_a_request_may_name_only_a_model_of_its_task_checked_before_queueing(tmp_path: Path) -> None:
    from inference.service import InferenceService
    from inference.tasks import get_task

    settings = Settings(weights_dir=tmp_path, classifier="resnet101")
    assert get_task("zebra").validate({"model": "style_monet"}, settings) == {"model": "style_monet"}
    assert get_task("zebra").validate({}, settings) == {}  # the worker's configured model
    # The configured classifier counts even when a family names it (no torchvision import here).
    assert get_task("classify").model_choices(settings) == ["efficientnet_lite0", "resnet101"]
    with pytest.raises(ValueError, match="unknown model 'fc'"):
        get_task("zebra").validate({"model": "fc"}, settings)  # a model of another task
    with pytest.raises(TypeError, match="takes no option 'model'"):
        get_task("caption").validate({"model": "fc"}, settings)  # its model is fixed
    async with InferenceService(settings) as service:
        with pytest.raises(ValueError, match="unknown model 'resnet18'"):
            service.submit("classify", photo(), model="resnet18")
        assert service.stats()["classify"].submitted == 0 and service.stats()["classify"].worker_starts == 0
