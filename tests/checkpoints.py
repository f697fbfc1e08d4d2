"""Checkpoint files in the exact layouts of the published ones (docs/checkpoints.md §2, §3).

The real files cannot be downloaded here, so tests write files with the same keys, shapes, dtypes
and serialisation format, filled with seeded random weights.  The layouts are written out from
the spec, not taken from the model classes under test, so a model whose keys drift from the
published files fails to load these.

The published files predate PyTorch 1.6, so they are in the legacy (non-zip) serialisation
format; these are too, which exercises the same `torch.load` path.
"""

from __future__ import annotations

import io
import shutil
from collections import OrderedDict
from pathlib import Path

import torch
import torchvision

#: The real fc-infos.pkl of the published captioner (1.3 MB), vendored for the unpickler tests.
REAL_FC_INFOS = Path(__file__).resolve().parent / "data" / "fc-infos.pkl"

Layout = dict[str, tuple[int, ...]]


# --- CycleGAN generator: horse2zebra_0.4.0.pth ------------------------------------------------

#: Indices in `model` of the InstanceNorm layers, and inside each residual block's `conv_block`.
_CYCLEGAN_NORMS = {2: 64, 5: 128, 8: 256, 20: 128, 23: 64}
_RESIDUAL_BLOCKS = range(10, 19)
_CONV_BLOCK_NORMS = (2, 6)


def cyclegan_layout() -> Layout:
    """48 tensors, 11,378,179 parameters, as listed in docs/checkpoints.md §2."""
    layout: Layout = {"model.1.weight": (64, 3, 7, 7), "model.1.bias": (64,)}
    layout |= {"model.4.weight": (128, 64, 3, 3), "model.4.bias": (128,)}
    layout |= {"model.7.weight": (256, 128, 3, 3), "model.7.bias": (256,)}
    for block in _RESIDUAL_BLOCKS:
        for conv in (1, 5):
            layout[f"model.{block}.conv_block.{conv}.weight"] = (256, 256, 3, 3)
            layout[f"model.{block}.conv_block.{conv}.bias"] = (256,)
    # ConvTranspose2d weights are (in_channels, out_channels, kH, kW).
    layout |= {"model.19.weight": (256, 128, 3, 3), "model.19.bias": (128,)}
    layout |= {"model.22.weight": (128, 64, 3, 3), "model.22.bias": (64,)}
    layout |= {"model.26.weight": (3, 64, 7, 7), "model.26.bias": (3,)}
    return layout


def _stale_norm_stats() -> dict[str, torch.Tensor]:
    """What PyTorch 0.4.0 saved for InstanceNorm layers in older CycleGAN zoo files."""
    owners = {f"model.{index}": channels for index, channels in _CYCLEGAN_NORMS.items()}
    owners |= {f"model.{block}.conv_block.{norm}": 256 for block in _RESIDUAL_BLOCKS for norm in _CONV_BLOCK_NORMS}
    stats: dict[str, torch.Tensor] = {}
    for owner, channels in owners.items():
        stats[f"{owner}.running_mean"] = torch.zeros(channels)
        stats[f"{owner}.running_var"] = torch.ones(channels)
        stats[f"{owner}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return stats


def write_cyclegan_checkpoint(path: str | Path, *, seed: int = 0, stale_norm_stats: bool = False) -> Path:
    """A generator file in the layout of horse2zebra_0.4.0.pth; with `stale_norm_stats`, one of
    the older zoo files that also carry InstanceNorm running statistics."""
    generator = torch.Generator().manual_seed(seed)
    state = OrderedDict((key, _random_tensor(key, shape, generator)) for key, shape in cyclegan_layout().items())
    if stale_norm_stats:
        state.update(_stale_norm_stats())
    return _save(state, Path(path))


# --- Captioner: fc-model.pth, fc-infos.pkl, resnet101.pth ---------------------------------------

VOCAB_SIZE = 9487  # words 1…9487; index 0 is the end token
ENCODING_SIZE = 512
RNN_SIZE = 512
FC_FEAT_SIZE = 2048


def fc_model_layout() -> Layout:
    """The 9 tensors of fc-model.pth (docs/checkpoints.md §3)."""
    return {
        "img_embed.weight": (ENCODING_SIZE, FC_FEAT_SIZE),
        "img_embed.bias": (ENCODING_SIZE,),
        "core.i2h.weight": (5 * RNN_SIZE, ENCODING_SIZE),
        "core.i2h.bias": (5 * RNN_SIZE,),
        "core.h2h.weight": (5 * RNN_SIZE, RNN_SIZE),
        "core.h2h.bias": (5 * RNN_SIZE,),
        "embed.weight": (VOCAB_SIZE + 1, ENCODING_SIZE),
        "logit.weight": (VOCAB_SIZE + 1, RNN_SIZE),
        "logit.bias": (VOCAB_SIZE + 1,),
    }


def resnet101_layout() -> Layout:
    """torchvision's ResNet-101 key names and shapes, fc included, without the
    `num_batches_tracked` counters (the converted Caffe file predates them)."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        reference = torchvision.models.resnet101()
    return {
        key: tuple(value.shape)
        for key, value in reference.state_dict().items()
        if not key.endswith("num_batches_tracked")
    }


def write_captioner_dir(directory: str | Path, *, seed: int = 0, split_encoder: bool = True) -> Path:
    """fc-model.pth, fc-infos.pkl (the real one) and the encoder, as resnet101a.pth +
    resnet101b.pth (two byte halves, as published) or as one resnet101.pth."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    fc_model = OrderedDict((key, _random_tensor(key, shape, generator)) for key, shape in fc_model_layout().items())
    _save(fc_model, directory / "fc-model.pth")
    shutil.copyfile(REAL_FC_INFOS, directory / "fc-infos.pkl")
    encoder = io.BytesIO()
    torch.save(_resnet101_state(generator), encoder, _use_new_zipfile_serialization=False)
    data = encoder.getbuffer()
    if split_encoder:
        middle = len(data) // 2
        (directory / "resnet101a.pth").write_bytes(data[:middle])
        (directory / "resnet101b.pth").write_bytes(data[middle:])
    else:
        (directory / "resnet101.pth").write_bytes(data)
    return directory


def populate_weights_dir(weights_dir: str | Path) -> Path:
    """Both models in the WeightsStore's layout: cyclegan/horse2zebra_0.4.0.pth and
    captioner/{fc-model.pth, fc-infos.pkl, resnet101.pth} (the store keeps the joined file)."""
    weights_dir = Path(weights_dir)
    write_cyclegan_checkpoint(weights_dir / "cyclegan" / "horse2zebra_0.4.0.pth")
    write_captioner_dir(weights_dir / "captioner", split_encoder=False)
    return weights_dir


# --- filling the layouts ----------------------------------------------------------------------


def _resnet101_state(generator: torch.Generator) -> OrderedDict[str, torch.Tensor]:
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, shape in resnet101_layout().items():
        leaf = key.rpartition(".")[2]
        if leaf == "running_mean":
            state[key] = torch.randn(shape, generator=generator) * 0.1
        elif leaf == "running_var":
            state[key] = torch.rand(shape, generator=generator) + 0.5
        elif ".bn3." in key and leaf == "weight":
            # Small last-BN scale in each residual branch keeps 33 stacked blocks from growing
            # the activations without bound (what a trained network's statistics also do).
            state[key] = torch.rand(shape, generator=generator) * 0.2
        else:
            state[key] = _random_tensor(key, shape, generator)
    return state


def _random_tensor(key: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Weights scaled by fan-in (so activations stay finite), biases and norm shifts small."""
    if len(shape) >= 2:
        fan_in = 1
        for extent in shape[1:]:
            fan_in *= extent
        return torch.randn(shape, generator=generator) * (2.0 / fan_in) ** 0.5
    if key.endswith("weight"):  # a norm layer's scale
        return torch.rand(shape, generator=generator) * 0.5 + 0.5
    return torch.randn(shape, generator=generator) * 0.05


def _save(state: OrderedDict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return path
