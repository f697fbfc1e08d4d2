"""What a loaded model needs: measured by the export at the task's largest input, carried in the
sidecar, scaled and reported by the worker (`inference.runtime.needs`, `ModelShelf.memory_need`),
and the CycleGAN arena handing back what an unusually large photo grew."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from config import Settings
from inference.runtime import cache
from inference.runtime.needs import WorkingMemory, input_elements, largest_input, measure_working_memory
from inference.worker.models import ModelShelf
from inference.worker.protocol import WorkerConfig
from tests.conftest import REPO_ROOT
from tests.runtime_fixtures import MODELS, exported_cache  # noqa: F401 (a fixture)

MB = 1024 * 1024


def test_the_largest_input_is_a_full_batch_the_widest_shape_and_the_costliest_options(exported_cache) -> None:
    settings, pipelines = exported_cache.settings, {t: loaded.pipeline for t, loaded in exported_cache.loaded.items()}
    inputs, options = largest_input(pipelines["classify"], "classify", settings)
    assert len(inputs) == settings.max_batch_size == 2 and inputs[0].shape == (3, 224, 224)
    assert options == [{"top": 20}] * 2
    [generator_input], [no_options] = largest_input(pipelines["zebra"], "zebra", settings)
    assert generator_input.shape == (3, 64, 256) and no_options == {}  # ZEBRA_SIZE 64, long side up to 4×
    [encoder_input], [caption_options] = largest_input(pipelines["caption"], "caption", settings)
    assert encoder_input.shape == (3, 96, 96) and caption_options == {"beam": 10}  # CAPTION_SIZE 96: square


def test_the_export_records_each_runtimes_working_memory(exported_cache) -> None:
    for task, directory in exported_cache.directories.items():
        sidecar = json.loads((directory / cache.SIDECAR).read_text())
        pipeline = exported_cache.loaded[task].pipeline
        inputs, _ = largest_input(pipeline, task, exported_cache.settings)
        for runtime in ("onnx", "torch"):
            measured = WorkingMemory.from_json(sidecar["working_memory"][runtime])
            # At the largest input of the settings it was exported with (the bundled classifier's
            # export is shared by the whole test session: its batch may differ from these).
            assert measured is not None and measured.elements % input_elements(inputs[:1]) == 0, (task, runtime)
            assert 0 < measured.bytes < 1024 * MB, (task, runtime)
        assert exported_cache.loaded[task].working_memory == WorkingMemory.from_json(sidecar["working_memory"]["onnx"])


def test_the_measurement_sees_what_a_run_allocates() -> None:
    class Allocating:
        draft_size, fixed_input_size = (32, 32), False

        def preprocess(self, image):
            return np.zeros((3, image.height, image.width), np.float32)

        def run(self, inputs, options):
            block = np.ones(64 * MB, np.uint8)  # touched: resident
            return [int(block[-1])] * len(inputs)

    measured = measure_working_memory(Allocating(), "zebra", Settings())
    assert 60 * MB <= measured.bytes < 64 * MB + 16 * MB  # the 64 MB block, give or take pages
    assert measured.elements == 3 * 32 * 256  # uncapped: 8:1 at the draft size, the widest shape tried


def test_a_measurement_scales_with_the_input() -> None:
    measured = WorkingMemory(100 * MB, 1000)
    assert measured.for_elements(3000) == 300 * MB
    assert measured.for_elements(250) == 25 * MB
    assert WorkingMemory.from_json({"bytes": "x"}) is None and WorkingMemory.from_json(None) is None


def test_a_worker_reports_its_resident_size_plus_its_models_working_memory(exported_cache) -> None:
    config = WorkerConfig.from_settings("zebra", exported_cache.settings)
    shelf = ModelShelf(config)
    assert shelf.memory_need() is None  # nothing loaded
    shelf.load(MODELS["zebra"], 1)
    working = shelf.working_bytes[MODELS["zebra"]]
    assert working == exported_cache.loaded["zebra"].working_memory.bytes  # same sizes: not scaled
    need = shelf.memory_need()
    assert need is not None and need > working + 50 * MB  # + this process's resident size


def test_a_worker_running_torch_has_no_measured_need(exported_cache) -> None:
    config = WorkerConfig.from_settings("zebra", exported_cache.settings.replace(inference_runtime="torch"))
    shelf = ModelShelf(config)
    shelf.load(MODELS["zebra"], 1)
    assert shelf.runtimes[MODELS["zebra"]] == "torch" and shelf.memory_need() is None


_GROWTH = """
import sys
import numpy as np
from inference.runtime.needs import resident_bytes
from inference.runtime.sessions import ThreadedSession
session = ThreadedSession(sys.argv[1], 1, shrink_above=None if sys.argv[2] == "never" else int(sys.argv[2]))
session.run({"image": np.zeros((1, 3, 64, 64), np.float32)})
before = resident_bytes()
session.run({"image": np.zeros((1, 3, 256, 1024), np.float32)})
print((resident_bytes() - before) // 2**20)
"""


def test_the_generator_hands_back_what_a_photo_beyond_the_usual_square_grew(exported_cache) -> None:
    model = exported_cache.directories["zebra"] / "model.onnx"

    def growth_mb(shrink_above: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", _GROWTH, str(model), str(shrink_above)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True,
        )
        return int(done.stdout.split()[-1])

    kept, shrunk = growth_mb("never"), growth_mb(str(3 * 64 * 64))
    assert kept > 200  # the arena keeps a 256×1024 run's activations
    assert shrunk < kept / 4


def test_which_sessions_hand_back_their_arena(exported_cache) -> None:
    pipelines = {task: loaded.pipeline for task, loaded in exported_cache.loaded.items()}
    assert pipelines["classify"].model.shrink_above is None  # small fixed-size batches: kept
    assert pipelines["zebra"].generator.shrink_above == 3 * 64 * 64  # above the usual square
    assert pipelines["caption"].encoder.shrink_above == 0  # after every photo
