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
from collections.abc import Mapping
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


def write_captioner_dir(
    directory: str | Path,
    *,
    seed: int = 0,
    split_encoder: bool = True,
    word_logit_bias: Mapping[int, float] | None = None,
) -> Path:
    """fc-model.pth, fc-infos.pkl (the real one) and the encoder, as resnet101a.pth +
    resnet101b.pth (two byte halves, as published) or as one resnet101.pth.

    `word_logit_bias` ({word index: amount}) is added to those words' `logit.bias`.  Random
    weights favour the end token (index 0) and UNK (index VOCAB_SIZE) no more than any other
    word; a test of the decoding rules needs a model that ends captions and prefers UNK."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    fc_model = OrderedDict((key, _random_tensor(key, shape, generator)) for key, shape in fc_model_layout().items())
    for word, amount in (word_logit_bias or {}).items():
        fc_model["logit.bias"][word] += amount
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


# --- hostile files: what a file declares, written without building it ---------------------------
# A hostile checkpoint declares tensors and storages it does not hold (or holds compressed).
# These writers pickle exactly what torch.save would, from declarations, so that a test can make
# a 1 GiB storage without ever allocating 1 GiB.

import pickle  # noqa: E402  (kept with the writers that need it)
import struct  # noqa: E402
import zlib  # noqa: E402

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_TYPES = {torch.float32: torch.FloatStorage, torch.float16: torch.HalfStorage, torch.int64: torch.LongStorage}


class _Storage:
    def __init__(self, key: str, storage_type: type, numel: int, location: str) -> None:
        self.key, self.storage_type, self.numel, self.location = key, storage_type, numel, location


class _Tensor:
    """Pickles as torch.save pickles a dense tensor (torch._utils._rebuild_tensor_v2)."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride, step = [], 1
        for extent in reversed(self.shape):
            stride.insert(0, step)
            step *= extent
        return (torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, tuple(stride), False, OrderedDict()))


class _Pickler(pickle.Pickler):
    def __init__(self, file, legacy: bool) -> None:
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            declared = ("storage", obj.storage_type, obj.key, obj.location, obj.numel)
            return declared + (None,) if self.legacy else declared
        return None


def write_declared_checkpoint(
    path: str | Path,
    shapes: dict[str, tuple[int, ...]],
    *,
    legacy: bool = False,
    storage_numel: dict[str, int] | None = None,
    dtype: torch.dtype = torch.float32,
    location: str = "cpu",
    deflate: bool = False,
) -> Path:
    """A checkpoint of zero-filled tensors of `shapes`, whose storages *declare*
    `storage_numel[key]` elements (default: the tensor's own).

    zip format: each `data/N` entry is as long as its declaration says, deflate-compressed when
    `deflate` (so 1 GiB of zeros takes ~1 MB of file).  legacy format: each storage's header
    states the declared count, but only the tensor's own bytes follow.
    """
    storage_numel = storage_numel or {}
    storage_type = _STORAGE_TYPES[dtype]
    element = dtype.itemsize
    storages, state = [], OrderedDict()
    for index, (key, shape) in enumerate(shapes.items()):
        numel = 1
        for extent in shape:
            numel *= extent
        storage = _Storage(str(index), storage_type, storage_numel.get(key, numel), location)
        storages.append((storage, numel * element))
        state[key] = _Tensor(storage, shape)
    body = io.BytesIO()
    if legacy:
        for header in (_LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, body, protocol=2)
        _Pickler(body, legacy=True).dump(state)
        pickle.dump([storage.key for storage, _ in storages], body, protocol=2)
        for storage, real_bytes in storages:
            body.write(struct.pack("<q", storage.numel) + bytes(real_bytes))
        Path(path).write_bytes(body.getvalue())
        return Path(path)
    _Pickler(body, legacy=False).dump(state)
    entries = [("archive/data.pkl", body.getvalue()), ("archive/byteorder", b"little"), ("archive/version", b"3")]
    writer = _ZipWriter()
    for name, data in entries:
        writer.add_stored(name, data)
    for storage, _ in storages:
        size = storage.numel * element
        if deflate:
            writer.add_deflated_zeros(f"archive/data/{storage.key}", size)
        else:
            writer.add_stored(f"archive/data/{storage.key}", bytes(size))
    Path(path).write_bytes(writer.finish())
    return Path(path)


class _ZipWriter:
    """Just enough of the zip format for the writer above (no zip64: entries under 4 GiB)."""

    _MiB = 1 << 20

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.central: list[bytes] = []

    def _add(self, name: str, method: int, crc: int, compressed: bytes, size: int) -> None:
        encoded = name.encode()
        offset = self.out.tell()
        fields = struct.pack("<HHHHHIIIHH", 20, 0, method, 0, 0, crc, len(compressed), size, len(encoded), 0)
        self.out.write(b"PK\x03\x04" + fields + encoded + compressed)
        self.central.append(
            b"PK\x01\x02" + struct.pack("<H", 20) + fields + struct.pack("<HHHII", 0, 0, 0, 0, offset) + encoded
        )

    def add_stored(self, name: str, data: bytes) -> None:
        self._add(name, 0, zlib.crc32(data), data, len(data))

    def add_deflated_zeros(self, name: str, size: int) -> None:
        # After a full flush deflate forgets its history, so each further MiB of zeros
        # compresses to the same bytes: compute them once and repeat them.
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        zeros = bytes(self._MiB)
        first = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
        repeated = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
        whole, rest = divmod(size, self._MiB)
        parts = [first] + [repeated] * (whole - 1) if whole else []
        parts.append(compressor.compress(bytes(rest)) + compressor.flush())
        crc = 0
        for _ in range(whole):
            crc = zlib.crc32(zeros, crc)
        crc = zlib.crc32(bytes(rest), crc)
        self._add(name, 8, crc, b"".join(parts), size)

    def finish(self) -> bytes:
        start = self.out.tell()
        directory = b"".join(self.central)
        self.out.write(directory)
        self.out.write(b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, len(self.central), len(self.central), len(directory), start, 0))
        return self.out.getvalue()
