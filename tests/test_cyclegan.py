"""The CycleGAN generator: published layout, safe and strict loading, preprocessing, PNG output."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from config import Settings
from inference.errors import CheckpointMismatch, WeightsCorrupt, WeightsMissing
from inference.models.cyclegan import (
    ResnetGenerator,
    ZebraPipeline,
    load_from_settings,
    load_generator,
    to_image,
)
from tests.checkpoints import cyclegan_layout, write_cyclegan_checkpoint


@pytest.fixture(scope="module")
def generator_file(tmp_path_factory) -> Path:
    return write_cyclegan_checkpoint(tmp_path_factory.mktemp("cyclegan") / "horse2zebra_0.4.0.pth", seed=1)


@pytest.fixture(scope="module")
def pipeline(generator_file) -> ZebraPipeline:
    return ZebraPipeline.from_checkpoint(generator_file, size=64)


def test_architecture_has_the_published_keys_shapes_and_parameter_count():
    generator = ResnetGenerator()
    state = generator.state_dict()
    assert {key: tuple(value.shape) for key, value in state.items()} == cyclegan_layout()
    assert len(state) == 48
    assert sum(parameter.numel() for parameter in generator.parameters()) == 11_378_179
    assert list(state)[:2] == ["model.1.weight", "model.1.bias"]


def test_generated_checkpoint_loads_strictly_with_its_weights(generator_file):
    generator = load_generator(generator_file)
    saved = torch.load(generator_file, weights_only=True)
    loaded = generator.state_dict()
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[key], saved[key]) for key in saved)
    assert not generator.training


def test_stale_instance_norm_statistics_are_dropped(tmp_path, generator_file):
    stale = write_cyclegan_checkpoint(tmp_path / "old_zoo.pth", seed=1, stale_norm_stats=True)
    keys = torch.load(stale, weights_only=True).keys()
    assert "model.2.running_mean" in keys and "model.10.conv_block.6.num_batches_tracked" in keys
    generator = load_generator(stale)
    reference = load_generator(generator_file)
    assert all(torch.equal(a, b) for a, b in zip(generator.state_dict().values(), reference.state_dict().values()))


def test_running_stats_of_a_non_norm_layer_are_not_silently_dropped(tmp_path):
    path = write_cyclegan_checkpoint(tmp_path / "g.pth")
    state = torch.load(path, weights_only=True)
    state["model.1.running_mean"] = torch.zeros(64)  # model.1 is a convolution
    torch.save(state, path)
    with pytest.raises(CheckpointMismatch, match=r"1 unexpected key \(model\.1\.running_mean\)"):
        load_generator(path)


def test_wrong_layout_names_missing_unexpected_and_misshapen_keys(tmp_path):
    path = write_cyclegan_checkpoint(tmp_path / "g.pth")
    state = torch.load(path, weights_only=True)
    state["model.27.weight"] = state.pop("model.26.weight")
    state["model.27.bias"] = state.pop("model.26.bias")
    state["model.1.weight"] = torch.zeros(32, 3, 7, 7)
    torch.save(state, path)
    with pytest.raises(CheckpointMismatch) as caught:
        load_generator(path)
    message = str(caught.value)
    assert "g.pth does not fit ResnetGenerator" in message
    assert "2 missing keys (model.26.weight, model.26.bias)" in message
    assert "2 unexpected keys (model.27.weight, model.27.bias)" in message
    assert "1 shape mismatch (model.1.weight: file (32, 3, 7, 7) vs. model (64, 3, 7, 7))" in message


def test_a_different_architecture_lists_a_few_keys_and_counts(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)).state_dict(), path)
    with pytest.raises(CheckpointMismatch) as caught:
        load_generator(path)
    message = str(caught.value)
    assert "48 missing keys (model.1.weight, model.1.bias, model.4.weight, model.4.bias, …)" in message
    assert "6 unexpected keys (0.weight, 0.bias, 1.weight, 1.bias, …)" in message


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint at all", b"PK\x03\x04 truncated zip", pickle.dumps({"a": 1}, protocol=2)],
    ids=["empty", "text", "broken-zip", "plain-pickle"],
)
def test_files_that_are_not_torch_state_dicts_are_corrupt(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsCorrupt, match="bad.pth"):
        load_generator(path)


def test_a_torch_file_that_is_not_a_mapping_of_tensors_is_corrupt(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    torch.save({"model.1.weight": 3}, tmp_path / "number.pth")
    with pytest.raises(WeightsCorrupt, match="holds a list, not a state dict"):
        load_generator(tmp_path / "list.pth")
    with pytest.raises(WeightsCorrupt, match="1 entries are not tensors"):
        load_generator(tmp_path / "number.pth")


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model.1.weight": _Exploit(marker)}, path)
    with pytest.raises(WeightsCorrupt):
        load_generator(path)
    assert not marker.exists()


def test_a_missing_file_is_weights_missing(tmp_path):
    with pytest.raises(WeightsMissing):
        load_generator(tmp_path / "nowhere.pth")


# --- preprocessing ----------------------------------------------------------------------------


def _random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def test_conforming_image_is_not_resampled_and_is_scaled_to_minus_one_one(pipeline):
    pixels = np.array(_random_image(60, 44))  # multiples of 4, short side <= 64
    pixels[0, 0], pixels[0, 1] = (0, 0, 0), (255, 255, 255)
    image = Image.fromarray(pixels)
    tensor = pipeline.preprocess(image)
    assert tensor.shape == (3, 44, 60)
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 * 2 - 1
    torch.testing.assert_close(tensor, expected)
    assert tensor[:, 0, 0].tolist() == [-1.0] * 3 and tensor[:, 0, 1].tolist() == [1.0] * 3


@pytest.mark.parametrize(
    ("size", "expected"),
    [((400, 300), (84, 64)), ((301, 401), (64, 84)), ((64, 64), (64, 64)), ((128, 66), (124, 64))],
)
def test_large_images_get_short_side_size_and_multiple_of_4_sides(pipeline, size, expected):
    tensor = pipeline.preprocess(_random_image(*size))
    assert (tensor.shape[2], tensor.shape[1]) == expected


def test_small_nonconforming_image_is_rounded_to_multiples_of_4_not_enlarged(pipeline):
    tensor = pipeline.preprocess(_random_image(50, 30))
    assert tensor.shape[1] % 4 == 0 and tensor.shape[2] % 4 == 0
    assert abs(tensor.shape[2] - 50) <= 2 and abs(tensor.shape[1] - 30) <= 2


def test_panorama_long_side_is_capped(pipeline):
    tensor = pipeline.preprocess(_random_image(2000, 100))
    assert tensor.shape[2] == 4 * 64 and tensor.shape[1] % 4 == 0 and tensor.shape[1] >= 8


def test_size_must_be_a_multiple_of_4(generator_file):
    with pytest.raises(ValueError, match="multiple of 4"):
        ZebraPipeline(ResnetGenerator(), size=250)


# --- output -----------------------------------------------------------------------------------


def test_output_tensor_maps_minus_one_one_to_0_255():
    output = torch.tensor([-1.0, 0.0, 1.0, -2.0]).view(1, 1, 4).expand(3, 1, 4)
    assert np.asarray(to_image(output))[0, :, 0].tolist() == [0, 128, 255, 0]


def test_run_returns_pngs_of_the_working_size_in_input_order(pipeline):
    inputs = [pipeline.preprocess(_random_image(*size, seed=i)) for i, size in enumerate([(80, 64), (64, 64), (80, 64)])]
    pngs = pipeline.run(inputs, [{}] * 3)
    assert len(pngs) == 3
    for png, tensor in zip(pngs, inputs):
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        image = Image.open(io.BytesIO(png))
        image.load()
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.size == (tensor.shape[2], tensor.shape[1])
    with torch.inference_mode():
        direct = to_image(pipeline.generator(inputs[1].unsqueeze(0))[0])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(pngs[1]))), np.asarray(direct))
    assert pngs[0] != pngs[2]  # different inputs of one shape keep their own outputs


def test_batched_equal_shapes_give_the_same_images_as_one_by_one(pipeline, generator_file):
    batched = ZebraPipeline.from_checkpoint(generator_file, size=64)
    batched.batch_same_shapes = True
    inputs = [pipeline.preprocess(_random_image(64, 64, seed=i)) for i in range(2)]
    inputs.insert(1, pipeline.preprocess(_random_image(96, 64, seed=9)))
    for one, other in zip(pipeline.run(inputs, [{}] * 3), batched.run(inputs, [{}] * 3)):
        a = np.asarray(Image.open(io.BytesIO(one)), dtype=np.int16)
        b = np.asarray(Image.open(io.BytesIO(other)), dtype=np.int16)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1


def test_zebra_of_the_book_horse_photo(pipeline, horse_jpg):
    image = Image.open(io.BytesIO(horse_jpg))
    tensor = pipeline.preprocess(image)
    assert min(tensor.shape[1:]) == 64 and tensor.shape[1] % 4 == 0 and tensor.shape[2] % 4 == 0
    assert -1.0 <= float(tensor.min()) < -0.5 and 0.5 < float(tensor.max()) <= 1.0
    png = pipeline.transform(image)
    assert Image.open(io.BytesIO(png)).size == (tensor.shape[2], tensor.shape[1])


def test_pipeline_contract_attributes(pipeline):
    assert pipeline.name == "horse2zebra"
    assert pipeline.fixed_input_size is False
    assert pipeline.draft_size == (64, 64)


def test_load_from_settings_uses_the_weights_store(generated_weights_dir):
    settings = Settings(weights_dir=generated_weights_dir, zebra_size=128)
    zebra = load_from_settings(settings, torch.device("cpu"))
    assert zebra.name == "horse2zebra" and zebra.size == 128
    assert zebra.preprocess(_random_image(300, 200)).shape == (3, 128, 192)


def test_load_from_settings_missing_weights_says_so(tmp_path):
    with pytest.raises(WeightsMissing):
        load_from_settings(Settings(weights_dir=tmp_path), torch.device("cpu"))
