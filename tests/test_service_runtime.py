"""The runtime each worker runs its model in, seen from the service: INFERENCE_RUNTIME reaches
the worker processes, a worker that runs ONNX Runtime never loads torch, and both runtimes give
the same answers on the bundled photos.

Whether a worker loaded torch is read from the worker process itself: `/proc/PID/maps` lists
every shared library it mapped, and importing torch maps `libtorch_cpu.so`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from config import Settings
from inference.service import InferenceService
from inference.tasks import TASKS
from tests.conftest import IMAGES, assert_dog

pytestmark = pytest.mark.asyncio

SHARED = dict(device="cpu", cpu_cores=1, request_timeout_s=120.0, model_load_timeout_s=600.0)


def loaded_torch(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "libtorch_cpu" in maps or "/torch/lib/" in maps


def small_jpeg(name: str, size: tuple[int, int] = (256, 192)) -> bytes:
    with Image.open(IMAGES / name) as image:
        buffer = io.BytesIO()
        image.convert("RGB").resize(size).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()


async def answers(settings: Settings) -> tuple[dict[str, object], list]:
    async with InferenceService(settings) as service:
        states = await service.warm_up()
        assert [state.state for state in states] == ["ready"] * len(TASKS), states
        results = {
            "classify": await service.classify(small_jpeg("bobby.jpg")),
            "zebra": await service.zebra(small_jpeg("horse.jpg")),
            "caption": await service.caption(small_jpeg("bobby.jpg")),
        }
        states = service.models()
        torch_in = {state.task: loaded_torch(state.worker_pid) for state in states if state.worker_pid}
    return results, [(state.task, state.runtime, torch_in.get(state.task)) for state in states]


async def test_onnx_workers_never_load_torch_and_answer_like_the_torch_ones(generated_weights_dir: Path):
    onnx_results, onnx_states = await answers(
        Settings(weights_dir=generated_weights_dir, inference_runtime="onnx", **SHARED)
    )
    assert onnx_states == [(task, "onnx", False) for task in TASKS]
    torch_results, torch_states = await answers(
        Settings(weights_dir=generated_weights_dir, inference_runtime="torch", **SHARED)
    )
    assert torch_states == [(task, "torch", True) for task in TASKS]

    assert_dog(onnx_results["classify"])
    assert [p.label for p in onnx_results["classify"]] == [p.label for p in torch_results["classify"]]
    for ours, theirs in zip(onnx_results["classify"], torch_results["classify"]):
        assert ours.probability == pytest.approx(theirs.probability, abs=0.01)
    assert onnx_results["caption"] == torch_results["caption"]
    with Image.open(io.BytesIO(onnx_results["zebra"])) as a, Image.open(io.BytesIO(torch_results["zebra"])) as b:
        ours, theirs = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 2  # the 2/255
