"""The contract between a model module and whatever runs it (the CLI, the worker queue).

A *pipeline* is one loaded model plus its preprocessing and postprocessing:

    image = decode_image(data, limits, draft_size=pipeline.draft_size)   # inference.images
    tensor = pipeline.preprocess(image)                                   # CPU, one image
    results = pipeline.run([tensor, ...], [options, ...])                 # a batch, on the device

`run` returns one plain, picklable result per input (a list of `Prediction`, PNG bytes, a
caption string), so results cross the worker-process boundary as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # only for annotations: the bot's process unpickles `Prediction` without torch
    import torch
    from PIL import Image


@dataclass(frozen=True)
class Prediction:
    label: str
    #: Softmax probability in percent (0–100).
    probability: float


class Pipeline(Protocol):
    #: Name of the loaded model (`efficientnet_lite0`, `horse2zebra`, `fc`…).
    name: str
    #: Smallest (width, height) the model needs; lets the decoder shrink big JPEGs while
    #: decoding (Pillow's draft mode).  None: decode at full size.
    draft_size: tuple[int, int] | None
    #: True when every preprocessed tensor has the same shape, so a batch can be stacked.
    fixed_input_size: bool

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An RGB image → the model's input tensor (C, H, W) on the CPU."""
        ...

    def run(self, inputs: list[torch.Tensor], options: list[dict[str, Any]]) -> list[Any]:
        """Run a batch; `options[i]` are the per-request options of `inputs[i]` (e.g. `top`)."""
        ...
