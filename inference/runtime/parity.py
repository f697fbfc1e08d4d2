"""The export's checks: does ONNX Runtime give what eager PyTorch gives, and how fast is each.

Runs in the export process, on the files just written (through the ONNX Runtime pipeline the
worker would load), against the torch pipeline they were exported from, on a seeded random
probe and on the bundled samples (`inference/samples/*.jpg`, decoded as the worker decodes):

- the numpy preprocessing against the torch one (same PIL image);
- classify: logits within `LOGIT_TOLERANCE`, the same top-1 everywhere;
- zebra: the output images within `PIXEL_TOLERANCE` levels of 255;
- caption: features and their embedding within `FEATURE_TOLERANCE` (relative to their size),
  and the same caption words, greedy and beam search, at every width checked.

Timings: the median of a few runs each, eager and ORT in turns, same input, same thread count.
The loader's `auto` rule reads them from the sidecar.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from config import Settings
from inference.images import decode_image
from inference.runtime.cache import CachedExport

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
LOGIT_TOLERANCE = 1e-3
PIXEL_TOLERANCE = 2
#: Times the largest feature magnitude (ResNet-101 features run into the tens).
FEATURE_TOLERANCE = 1e-4
PREPROCESS_TOLERANCE = 1e-5


def sample_images(draft_size: tuple[int, int] | None) -> list[Any]:
    return [decode_image(path.read_bytes(), draft_size=draft_size) for path in sorted(SAMPLES.glob("*.jpg"))]


def paired_medians_ms(eager: Callable[[], Any], onnx: Callable[[], Any], runs: int) -> tuple[float, float]:
    """The median time of each, in ms, their runs taken in turns (eager, ORT, eager, ORT…).

    In turns, so that whatever changes while the export runs (another process waking up, the
    machine's clock, memory being faulted in) weighs on both alike: timed one block after the
    other, the CycleGAN generator measured 10 % apart either way on the same machine, and the
    `auto` rule draws its line at 5 %.  Each runs once first, untimed: first-run allocations
    and ORT's lazy initialisation.
    """
    eager_times: list[float] = []
    onnx_times: list[float] = []
    with torch.inference_mode():
        eager(), onnx()
        for _ in range(max(1, runs)):
            for function, times in ((eager, eager_times), (onnx, onnx_times)):
                started = time.perf_counter()
                function()
                times.append(time.perf_counter() - started)
    return statistics.median(eager_times) * 1000.0, statistics.median(onnx_times) * 1000.0


def _max_diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def check_parity(
    task: str, torch_pipeline: Any, export: CachedExport, settings: Settings, threads: int, runs: int
) -> dict[str, Any]:
    """{"parity": {...,"passed"}, "timing": {"threads", "runs", "cases": {name: {eager_ms, onnx_ms}}}}."""
    from inference.runtime.loader import build_onnx_pipeline

    onnx_pipeline = build_onnx_pipeline(task, export, settings, threads)
    images = sample_images(torch_pipeline.draft_size)
    preprocess_diff = max(
        _max_diff(torch_pipeline.preprocess(image).numpy(), onnx_pipeline.preprocess(image)) for image in images
    )
    tensors = [torch_pipeline.preprocess(image) for image in images]
    parity, cases = CHECKS[task](torch_pipeline, onnx_pipeline, tensors, settings, runs)
    parity["preprocess_max_abs_diff"] = preprocess_diff
    parity["preprocess_tolerance"] = PREPROCESS_TOLERANCE
    parity["samples"] = len(images)
    parity["passed"] = bool(parity["passed"] and preprocess_diff <= PREPROCESS_TOLERANCE)
    return {"parity": parity, "timing": {"threads": threads, "runs": runs, "cases": cases}}


def _classify(torch_pipeline: Any, onnx_pipeline: Any, tensors: list[torch.Tensor], settings: Settings, runs: int):
    crop = tensors[0].shape[-1]
    probe = torch.randn(2, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    batch = torch.cat([probe, torch.stack(tensors)])
    with torch.inference_mode():
        eager = torch_pipeline.model(batch).float().numpy()
    onnx = onnx_pipeline.logits(batch.numpy())
    difference = _max_diff(eager, onnx)
    same_top1 = bool((eager.argmax(axis=1) == onnx.argmax(axis=1)).all())
    parity = {
        "max_abs_diff": difference,
        "tolerance": LOGIT_TOLERANCE,
        "same_top1": same_top1,
        "passed": difference <= LOGIT_TOLERANCE and same_top1,
    }
    cases = {}
    for size in (1, max(1, settings.max_batch_size)):
        inputs = torch.stack([tensors[i % len(tensors)] for i in range(size)])
        array = inputs.numpy()
        eager_ms, onnx_ms = (
            ms / size for ms in paired_medians_ms(lambda: torch_pipeline.model(inputs), lambda: onnx_pipeline.logits(array), runs)
        )
        cases[f"batch {size}, per image"] = {"eager_ms": round(eager_ms, 3), "onnx_ms": round(onnx_ms, 3)}
    return parity, cases


def _zebra(torch_pipeline: Any, onnx_pipeline: Any, tensors: list[torch.Tensor], settings: Settings, runs: int):
    from inference.models.cyclegan import to_image
    from inference.runtime.pipelines import to_image as onnx_to_image

    probe = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    raw_diff, pixel_diff = 0.0, 0
    for tensor in [probe, *tensors]:
        with torch.inference_mode():
            eager = torch_pipeline.generator(tensor.unsqueeze(0))[0]
        onnx = onnx_pipeline.generate(tensor.unsqueeze(0).numpy())[0]
        raw_diff = max(raw_diff, _max_diff(eager.numpy(), onnx))
        eager_pixels = np.asarray(to_image(eager), dtype=np.int16)
        onnx_pixels = np.asarray(onnx_to_image(onnx), dtype=np.int16)
        pixel_diff = max(pixel_diff, int(np.abs(eager_pixels - onnx_pixels).max()))
    parity = {
        "max_abs_diff": raw_diff,
        "max_pixel_diff": pixel_diff,
        "tolerance": PIXEL_TOLERANCE,
        "passed": pixel_diff <= PIXEL_TOLERANCE,
    }
    size = torch_pipeline.size
    square = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    array = square.numpy()
    eager_ms, onnx_ms = paired_medians_ms(lambda: torch_pipeline.generator(square), lambda: onnx_pipeline.generate(array), runs)
    return parity, {f"{size}x{size}": {"eager_ms": round(eager_ms, 3), "onnx_ms": round(onnx_ms, 3)}}


def _caption(torch_pipeline: Any, onnx_pipeline: Any, tensors: list[torch.Tensor], settings: Settings, runs: int):
    model = torch_pipeline.model
    probe = torch.randn(3, 64, 80, generator=torch.Generator().manual_seed(0))
    inputs = [probe, *tensors]
    with torch.inference_mode():
        features = torch.cat([torch_pipeline.encoder(t.unsqueeze(0)) for t in inputs])
        embeddings = model.img_embed(features)
    onnx_features, onnx_embeddings = onnx_pipeline.encode([t.numpy() for t in inputs])
    scale = max(1.0, float(features.abs().max()), float(embeddings.abs().max()))
    difference = max(_max_diff(features.numpy(), onnx_features), _max_diff(embeddings.numpy(), onnx_embeddings))
    widths = sorted({1, 2, max(1, torch_pipeline.beam)})
    with torch.inference_mode():
        eager_words = [[caption.words for caption in model.caption(features, beam=width)] for width in widths]
    onnx_words = [onnx_pipeline.captions(onnx_embeddings, [width] * len(inputs)) for width in widths]
    same_words = eager_words == onnx_words
    parity = {
        "max_abs_diff": difference,
        "tolerance": FEATURE_TOLERANCE * scale,
        "beam_widths": widths,
        "same_words": same_words,
        "passed": difference <= FEATURE_TOLERANCE * scale and same_words,
    }
    image = tensors[-1].unsqueeze(0)
    array = image.numpy()
    eager_ms, onnx_ms = paired_medians_ms(lambda: torch_pipeline.encoder(image), lambda: onnx_pipeline.encoder.run({"image": array}), runs)
    name = f"encoder {image.shape[-1]}x{image.shape[-2]}"
    return parity, {name: {"eager_ms": round(eager_ms, 3), "onnx_ms": round(onnx_ms, 3)}}


CHECKS = {"classify": _classify, "zebra": _zebra, "caption": _caption}
