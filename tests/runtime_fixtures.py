"""One exported ONNX cache for the runtime tests (tests/test_runtime_*.py import these fixtures).

The three models are exported once per test session, through the worker's own entry point
(`load_for_worker`, so the export runs in its spawned child): the real bundled EfficientNet-Lite0,
and the generated CycleGAN and captioner checkpoints in the published layouts, at small sizes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from config import Settings

#: (task, model) of the three exported models.
MODELS = {"classify": "efficientnet_lite0", "zebra": "horse2zebra", "caption": "fc"}


def runtime_settings(weights_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "weights_dir": weights_dir,
        "zebra_size": 64,
        "caption_size": 96,
        "max_batch_size": 2,
        # Forced: under `auto` the choice would hang on timings taken on a busy 2-core machine;
        # the `auto` rule has tests of its own, on given timings.
        "inference_runtime": "onnx",
    }
    return Settings(**(values | overrides))  # type: ignore[arg-type]


@dataclass(frozen=True)
class ExportedCache:
    settings: Settings
    #: task → the `LoadedPipeline` the first (exporting) load returned.
    loaded: dict
    #: task → the directory of its export.
    directories: dict[str, Path]


@pytest.fixture(scope="session")
def exported_cache(tmp_path_factory) -> ExportedCache:
    from inference.runtime.cache import model_dir
    from inference.runtime.loader import load_for_worker
    from tests.checkpoints import populate_weights_dir

    settings = runtime_settings(populate_weights_dir(tmp_path_factory.mktemp("runtime_weights")))
    loaded = {task: load_for_worker(task, name, settings, "cpu", 1, timing_runs=1) for task, name in MODELS.items()}
    directories = {}
    for task, name in MODELS.items():
        keys = [p for p in model_dir(settings, name).iterdir() if p.is_dir() and p.name[0] != "."]
        (directories[task],) = keys
    return ExportedCache(settings, loaded, directories)


# Stand-ins for `inference.runtime.loader.export_child` (named by `loader.EXPORT_CHILD`), run in
# the child process.  They live in this torch-free module so that the child starts in well under
# a second.


def failing_export_child(fd: int) -> None:
    from inference.runtime.loader import ExportRequest, reply

    ExportRequest.read()
    reply(fd, "error", "RuntimeError: the exporter cannot handle this model")


def crashing_export_child(fd: int) -> None:
    """Dies half way through writing its export."""
    from inference.runtime.cache import staging_dir
    from inference.runtime.loader import ExportRequest

    request = ExportRequest.read()
    (staging_dir(request.settings, request.model_name) / "model.onnx").write_bytes(b"half an export")
    os._exit(3)


def hanging_export_child(fd: int) -> None:
    time.sleep(60)
