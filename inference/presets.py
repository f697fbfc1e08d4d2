"""Preprocessing presets: what each model expects of its input pixels, each fact written once.

In the spirit of torchvision's `transforms/_presets.py`: a preset names the recipe (sizes,
mean/std, resampling filter), and the registry entry of a model names its preset.  This module
imports neither torch nor torchvision, so the registry, the bot and a worker that runs ONNX
Runtime (issue 14) read the same facts; the torch pipelines turn them into tensors.

The bounded Pillow geometry the recipes use (`resize_center_crop`, `scale_to_fit`) stays in
`inference.images`, beside the decoder's limits: both exist so that no image, however thin,
costs more than its output size, and the hostile-image tests exercise them together.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from PIL import Image

from config import Settings

#: ImageNet statistics (of the training set's RGB pixels in [0, 1]), as torchvision's weights use.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: EfficientNet-Lite was trained on pixels mapped to about [-1, 1] (x·255 − 127) / 128, not on the
#: ImageNet statistics: with those the book's horse photo is misclassified.
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3
#: CycleGAN's generators were trained on (x − 0.5) / 0.5, i.e. [-1, 1]; their tanh output is the
#: same range.  The book's notebook forgot this step.
SYMMETRIC_MEAN = (0.5,) * 3
SYMMETRIC_STD = (0.5,) * 3


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, image: Image.Image) -> np.ndarray:
        """An 8-bit RGB image → float32 (C, H, W), `(x / 255 - mean) / std` (what
        `TF.normalize(TF.to_tensor(image), mean, std)` computes, in numpy)."""
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return (pixels - mean) / std


IMAGENET = Normalization(IMAGENET_MEAN, IMAGENET_STD)
LITE = Normalization(LITE_MEAN, LITE_STD)
SYMMETRIC = Normalization(SYMMETRIC_MEAN, SYMMETRIC_STD)


@dataclass(frozen=True)
class Preset:
    """One preprocessing recipe.

    `kind` says which geometry applies:
    - "center_crop": short side to `resize`, centre crop `crop`×`crop` (torchvision's
      classification recipe);
    - "short_side": short side to `size` (not enlarged), long side at most `max_aspect` × `size`,
      sides rounded to `multiple` (CycleGAN's fully convolutional generator);
    - "long_side": long side at most `size` (the captioner's encoder).
    `size` 0 means the size comes from the settings field `size_setting`.
    """

    name: str
    kind: str
    normalization: Normalization
    resize: int = 0
    crop: int = 0
    size: int = 0
    size_setting: str = ""
    resample: Image.Resampling = Image.Resampling.BILINEAR

    def size_for(self, settings: Settings) -> int:
        return self.size or int(getattr(settings, self.size_setting))

    @property
    def default_size(self) -> int:
        """The size with the settings' defaults (for code that has no settings at hand)."""
        return self.size or int(getattr(Settings, self.size_setting))


#: torchvision's ImageNet evaluation recipe (`ImageClassification`'s defaults).
IMAGENET_CLASSIFICATION = Preset("imagenet", "center_crop", IMAGENET, resize=256, crop=224)
#: The same geometry with EfficientNet-Lite's normalisation.
LITE_CLASSIFICATION = Preset("lite", "center_crop", LITE, resize=256, crop=224)
#: torchvision classifiers: sizes, statistics and filter come from the weights' own
#: `transforms()`, read when the model loads (a ViT at 384 pixels is not ImageNet's 256/224); the
#: registry entry names this preset so that the source is explicit.  Sizes 0: not fixed here.
TORCHVISION_WEIGHTS = Preset("torchvision", "center_crop", IMAGENET, resize=0, crop=0)
CYCLEGAN = Preset("cyclegan", "short_side", SYMMETRIC, size_setting="zebra_size", resample=Image.Resampling.BICUBIC)
CAPTION = Preset("caption", "long_side", IMAGENET, size_setting="caption_size", resample=Image.Resampling.BICUBIC)

PRESETS: Mapping[str, Preset] = MappingProxyType(
    {p.name: p for p in (IMAGENET_CLASSIFICATION, LITE_CLASSIFICATION, TORCHVISION_WEIGHTS, CYCLEGAN, CAPTION)}
)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"no preprocessing preset {name!r}; known: {', '.join(PRESETS)}") from None
