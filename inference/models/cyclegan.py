"""The CycleGAN horse→zebra generator (the book's `horse2zebra_0.4.0.pth`).

The architecture is the ResNet generator of Zhu et al.'s CycleGAN, laid out so that its
`state_dict()` has exactly the keys and shapes of the published file: one `nn.Sequential`
named `model`, residual blocks with a `conv_block` inside (see docs/checkpoints.md §2).
It is fully convolutional: any input whose sides are multiples of 4 works (two stride-2
down-samplings, two matching up-samplings).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from itertools import groupby
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import functional as TF

from config import Settings
from inference.checkpoint import load_checkpoint
from inference.images import encode_png, scale_to_fit, to_rgb
from inference.presets import CYCLEGAN
from inference.registry import ModelEntry, get_model

DEFAULT_NAME: str = Settings.zebra_model
#: Short side of the working resolution (the settings' default; the book resizes to 256).
DEFAULT_SIZE: int = CYCLEGAN.default_size
#: Both sides must be multiples of this (two stride-2 convolutions, then two ×2 up-samplings).
SIDE_MULTIPLE = 4
#: Smallest side the network can run on: the residual blocks reflection-pad by 1 at 1/4 scale,
#: which needs at least 2 pixels there.
MIN_SIDE = 8
#: The long side is kept within this many times the short-side size, so that a panorama does not
#: cost many times the work of a photo (its short side then ends up below `size`).
MAX_ASPECT = 4
#: Stats that older CycleGAN zoo files carry for InstanceNorm layers, which have none.
STALE_NORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


class ResnetBlock(nn.Module):
    """`x + conv_block(x)`: two reflection-padded 3×3 convolutions on `channels` channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3),
            nn.InstanceNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """RGB in [-1, 1] (N, 3, H, W) → RGB in [-1, 1], same size; H and W multiples of 4."""

    def __init__(self, channels: int = 3, width: int = 64, residual_blocks: int = 9) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(channels, width, kernel_size=7),
            nn.InstanceNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        for factor in (1, 2):  # down-sampling: 64 → 128 → 256 channels
            layers += [
                nn.Conv2d(width * factor, width * factor * 2, kernel_size=3, stride=2, padding=1),
                nn.InstanceNorm2d(width * factor * 2),
                nn.ReLU(inplace=True),
            ]
        layers += [ResnetBlock(width * 4) for _ in range(residual_blocks)]
        for factor in (4, 2):  # up-sampling: 256 → 128 → 64 channels
            layers += [
                nn.ConvTranspose2d(
                    width * factor, width * factor // 2, kernel_size=3, stride=2, padding=1, output_padding=1
                ),
                nn.InstanceNorm2d(width * factor // 2),
                nn.ReLU(inplace=True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(width, channels, kernel_size=7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def stale_norm_stats(module: nn.Module) -> Callable[[str], bool]:
    """Whether a file's key is a running statistic of one of `module`'s InstanceNorm layers.

    PyTorch 0.4.0 briefly saved them for InstanceNorm; the layers never use them, so the loader
    drops them.  Only keys of InstanceNorm layers qualify: anything else fails the strict load.
    """
    norm_layers = {name for name, child in module.named_modules() if isinstance(child, nn.InstanceNorm2d)}

    def is_stale(key: str) -> bool:
        owner, _, leaf = key.rpartition(".")
        return leaf in STALE_NORM_STATS and owner in norm_layers

    return is_stale


def load_generator(path: str | os.PathLike[str], device: torch.device = torch.device("cpu")) -> ResnetGenerator:
    """Read a CycleGAN generator file safely and load it strictly; eval mode, on `device`.

    Raises `WeightsMissing` (no such file), `WeightsCorrupt` (not a torch state dict) or
    `CheckpointMismatch` (keys or shapes of another architecture).
    """
    generator = ResnetGenerator()
    load_checkpoint(generator, path, ignore=stale_norm_stats(generator))
    return generator.eval().to(device)


def working_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The (width, height) the generator runs at for an image of `width` × `height`.

    Large images are scaled so that the short side is `size`; images that are already small
    enough keep their scale.  Both sides are then rounded to multiples of 4.
    """
    scale = scale_to_fit(width, height, short_side=size, max_long_side=MAX_ASPECT * size, enlarge=False)

    def side(length: int) -> int:
        return max(MIN_SIDE, round(length * scale / SIDE_MULTIPLE) * SIDE_MULTIPLE)

    return side(width), side(height)


class ZebraPipeline:
    """Image → horse-to-zebra image, as PNG bytes."""

    fixed_input_size = False

    def __init__(
        self,
        generator: ResnetGenerator,
        *,
        size: int = DEFAULT_SIZE,
        device: torch.device = torch.device("cpu"),
        name: str = DEFAULT_NAME,
    ) -> None:
        if size < MIN_SIDE or size % SIDE_MULTIPLE:
            raise ValueError(f"size must be a multiple of {SIDE_MULTIPLE} and at least {MIN_SIDE}, not {size}")
        self.name = name
        self.size = size
        self.device = torch.device(device)
        self.generator = generator.eval().to(self.device)
        self.batch_same_shapes = self.device.type != "cpu"
        # JPEG draft decoding may shrink the image as long as both sides stay >= size.
        self.draft_size: tuple[int, int] | None = (size, size)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        *,
        size: int = DEFAULT_SIZE,
        device: torch.device = torch.device("cpu"),
        name: str = DEFAULT_NAME,
    ) -> ZebraPipeline:
        return cls(load_generator(path, device), size=size, device=device, name=name)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB image → (3, H, W) in [-1, 1], sides multiples of 4 (resampled only if needed)."""
        image = to_rgb(image)
        target = working_size(image.width, image.height, self.size)
        if target != image.size:
            image = image.resize(target, Image.Resampling.BICUBIC)
        scaling = CYCLEGAN.normalization  # [-1, 1]: see `inference.presets`
        return TF.normalize(TF.to_tensor(image), mean=scaling.mean, std=scaling.std)

    @torch.inference_mode()
    def run(self, inputs: list[torch.Tensor], options: list[dict[str, Any]]) -> list[bytes]:
        """One PNG per input.

        On the CPU every image runs on its own: batching made the generator *slower* per image
        (measured at 256×256 on 2 cores: 0.30 s one by one, 0.43 s per image in a batch of 4;
        at 256×384: 0.54 s vs. 0.61 s), presumably because a batch's activations no longer fit
        in cache.  Elsewhere (CUDA) inputs of equal shape run as one batch.
        """
        outputs: list[bytes | None] = [None] * len(inputs)
        groups = _same_shape_groups(inputs) if self.batch_same_shapes else [[i] for i in range(len(inputs))]
        for indices in groups:
            batch = torch.stack([inputs[i] for i in indices]).to(self.device)
            images = self.generator(batch).cpu()
            for index, image in zip(indices, images):
                outputs[index] = encode_png(to_image(image))
        return [png for png in outputs if png is not None]

    def transform(self, image: Image.Image) -> bytes:
        """One image, in this process: for the CLI and scripts."""
        return self.run([self.preprocess(image)], [{}])[0]


def to_image(output: torch.Tensor) -> Image.Image:
    """Generator output (3, H, W) in [-1, 1] → an 8-bit RGB image."""
    pixels = output.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return TF.to_pil_image(pixels)


def _same_shape_groups(inputs: Iterable[torch.Tensor]) -> list[list[int]]:
    keyed = sorted(((tuple(tensor.shape), index) for index, tensor in enumerate(inputs)))
    return [[index for _, index in group] for _, group in groupby(keyed, key=lambda item: item[0])]


def build(entry: ModelEntry, settings: Settings, device: torch.device) -> ZebraPipeline:
    """The registry's builder for every generator of the weights catalogue (`entry.weights`)."""
    from inference.weights import WeightsStore  # the store only where a model is built

    store = WeightsStore(settings.weights_dir, auto_download=settings.auto_download)
    path = store.ensure_model(entry.weights)["generator"]
    return ZebraPipeline.from_checkpoint(path, size=CYCLEGAN.size_for(settings), device=device, name=entry.name)


def load_from_settings(settings: Settings, device: torch.device) -> ZebraPipeline:
    """The generator that `settings.zebra_model` names, through the registry."""
    return get_model(settings.zebra_model, task="zebra").load(settings, device)
