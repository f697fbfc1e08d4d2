"""inference.presets: the normalisation constants and recipes, checked against their sources."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import functional as TF

from config import Settings
from inference.images import ImageLimits
from inference.presets import (
    CAPTION,
    CYCLEGAN,
    IMAGENET_CLASSIFICATION,
    LITE,
    SYMMETRIC,
    get_preset,
)
from tests.conftest import REPO_ROOT


def noise_image(seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_imagenet_recipe_is_torchvisions() -> None:
    recipe = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()
    assert IMAGENET_CLASSIFICATION.normalization.mean == tuple(recipe.mean)
    assert IMAGENET_CLASSIFICATION.normalization.std == tuple(recipe.std)
    assert (IMAGENET_CLASSIFICATION.resize, IMAGENET_CLASSIFICATION.crop) == (
        recipe.resize_size[0], recipe.crop_size[0])


@pytest.mark.parametrize("preset", ["imagenet", "lite", "cyclegan", "caption"])
def test_numpy_normalisation_equals_torchvisions(preset: str) -> None:
    normalization = get_preset(preset).normalization
    image = noise_image()
    expected = TF.normalize(TF.to_tensor(image), list(normalization.mean), list(normalization.std))
    actual = normalization(image)
    assert actual.dtype == np.float32 and actual.shape == (3, 37, 53)
    torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=0, atol=1e-6)


def test_lite_and_cyclegan_scalings_map_pixels_to_about_minus_one_to_one() -> None:
    values = Image.fromarray(np.array([[[0] * 3, [127] * 3, [128] * 3, [255] * 3]], dtype=np.uint8))
    lite = LITE(values)[0, 0]
    np.testing.assert_allclose(lite, [(0 - 127) / 128, 0.0, 1 / 128, 1.0], atol=1e-6)
    symmetric = SYMMETRIC(values)[0, 0]
    np.testing.assert_allclose(symmetric, [-1.0, 127 / 127.5 - 1, 128 / 127.5 - 1, 1.0], atol=1e-6)


def test_sizes_come_from_the_settings() -> None:
    assert CYCLEGAN.size_for(Settings(zebra_size=128)) == 128
    assert CAPTION.size_for(Settings(caption_size=300)) == 300
    assert (CYCLEGAN.default_size, CAPTION.default_size) == (Settings().zebra_size, Settings().caption_size)


def test_image_limits_default_to_the_settings_defaults() -> None:
    assert ImageLimits() == ImageLimits.from_settings(Settings())
    changed = Settings(max_image_bytes=1000, max_image_pixels=2000, max_image_aspect_ratio=3.0, max_jpeg_scans=4)
    assert ImageLimits.from_settings(changed) == ImageLimits(1000, 2000, 3.0, 4)


def test_unknown_preset_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="imagenet"):
        get_preset("nope")


def test_presets_import_no_torch() -> None:
    code = "import sys, inference.presets; print([m for m in ('torch', 'torchvision') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            check=True, timeout=60)
    assert result.stdout.strip() == "[]"
