"""The classifier and CycleGAN pipelines on ONNX Runtime: numpy, Pillow and onnxruntime only.

Same contract as the torch pipelines (`inference.pipeline.Pipeline`), same pixels in: the
geometry is `inference.images`' (the one the torch pipelines use), its numbers come from the
export's sidecar (written from the torch pipeline that was exported, not copied by hand), and
the normalisation is `inference.presets.Normalization`, which computes `TF.normalize(TF.to_tensor
(image))` in numpy.  The caption pipeline is in `inference.runtime.captioning`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from config import Settings
from inference.images import encode_png, resize_center_crop, scale_to_fit, to_rgb
from inference.pipeline import Prediction
from inference.presets import Normalization
from inference.runtime.cache import CachedExport
from inference.runtime.sessions import ThreadedSession
from inference.tasks import get_task

#: How many labels an answer has when the request does not say (the task's option default).
DEFAULT_TOP: int = get_task("classify").option("top").default_for(Settings())


def normalization(recipe: Mapping[str, Any]) -> Normalization:
    return Normalization(tuple(recipe["mean"]), tuple(recipe["std"]))


def resample(recipe: Mapping[str, Any]) -> Image.Resampling:
    return Image.Resampling[recipe["resample"]]


class OnnxClassifierPipeline:
    """Preprocessing → ONNX Runtime → softmax → top-k labels (`Prediction`s, in percent)."""

    fixed_input_size = True

    def __init__(self, export: CachedExport, threads: int = 1) -> None:
        sidecar = export.sidecar
        self.name: str = sidecar["model"]
        self.recipe = sidecar["preprocessing"]
        self.categories: list[str] = list(sidecar["categories"])
        self.model = ThreadedSession(export.path("model"), threads)
        self._normalize = normalization(self.recipe)
        self._resample = resample(self.recipe)
        self.draft_size: tuple[int, int] | None = (self.recipe["resize"], self.recipe["resize"])

    def set_threads(self, threads: int) -> None:
        self.model.set_threads(threads)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        image = resize_center_crop(to_rgb(image), self.recipe["resize"], self.recipe["crop"], self._resample)
        return self._normalize(image)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.model.run({"image": np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def run(self, inputs: list[np.ndarray], options: list[dict[str, Any]]) -> list[list[Prediction]]:
        logits = self.logits(np.stack(inputs)).astype(np.float32)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        results = []
        for row, option in zip(probabilities, options):
            k = min(max(1, int(option.get("top", DEFAULT_TOP))), row.shape[0])
            best = np.argsort(-row, kind="stable")[:k]
            results.append([Prediction(label=self._label(int(i)), probability=float(row[i]) * 100.0) for i in best])
        return results

    def classify(self, image: Image.Image, top: int = DEFAULT_TOP) -> list[Prediction]:
        return self.run([self.preprocess(image)], [{"top": top}])[0]

    def _label(self, index: int) -> str:
        return self.categories[index] if index < len(self.categories) else f"class {index}"


def working_size(width: int, height: int, size: int, recipe: Mapping[str, Any]) -> tuple[int, int]:
    """`inference.models.cyclegan.working_size` with the sidecar's numbers: short side to `size`
    (never enlarged), long side at most `max_aspect` × `size`, sides rounded to `multiple`."""
    multiple, min_side = recipe["multiple"], recipe["min_side"]
    scale = scale_to_fit(width, height, short_side=size, max_long_side=recipe["max_aspect"] * size, enlarge=False)

    def side(length: int) -> int:
        return max(min_side, round(length * scale / multiple) * multiple)

    return side(width), side(height)


def to_image(output: np.ndarray) -> Image.Image:
    """Generator output (3, H, W) in [-1, 1] → 8-bit RGB, rounded half to even like torch."""
    pixels = np.clip(np.round((output + np.float32(1)) * np.float32(127.5)), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), "RGB")


class OnnxZebraPipeline:
    """Image → horse-to-zebra image as PNG bytes; one image per run of the generator, as the
    torch pipeline does on the CPU (batching was slower per image there)."""

    fixed_input_size = False

    def __init__(self, export: CachedExport, threads: int = 1, size: int | None = None) -> None:
        sidecar = export.sidecar
        self.name: str = sidecar["model"]
        self.recipe = sidecar["preprocessing"]
        self.size = int(size or self.recipe["size"])
        if self.size < self.recipe["min_side"] or self.size % self.recipe["multiple"]:
            raise ValueError(
                f"size must be a multiple of {self.recipe['multiple']} and at least {self.recipe['min_side']}, "
                f"not {self.size}"
            )
        # Photos beyond the usual square give back what they grew (`ThreadedSession`).
        self.generator = ThreadedSession(export.path("model"), threads, shrink_above=3 * self.size * self.size)
        self._normalize = normalization(self.recipe)
        self._resample = resample(self.recipe)
        self.draft_size: tuple[int, int] | None = (self.size, self.size)

    def set_threads(self, threads: int) -> None:
        self.generator.set_threads(threads)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        image = to_rgb(image)
        target = working_size(image.width, image.height, self.size, self.recipe)
        if target != image.size:
            image = image.resize(target, self._resample)
        return self._normalize(image)

    def generate(self, batch: np.ndarray) -> np.ndarray:
        return self.generator.run({"image": np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def run(self, inputs: list[np.ndarray], options: list[dict[str, Any]]) -> list[bytes]:
        return [encode_png(to_image(self.generate(tensor[None])[0])) for tensor in inputs]

    def transform(self, image: Image.Image) -> bytes:
        return self.run([self.preprocess(image)], [{}])[0]
