"""Reading a weights file safely and loading it strictly, with errors that say what is wrong.

`load_state_dict_file` accepts only plain tensor state dicts (`weights_only=True`: no code runs
while reading); `load_strict` compares keys and shapes before loading so that a wrong file is
reported as "these keys are missing, these are extra, these have the wrong shape" instead of a
wall of `load_state_dict` output.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from inference.errors import CheckpointMismatch, WeightsCorrupt, WeightsMissing

StateDict = dict[str, torch.Tensor]

#: How many keys of each kind a mismatch message names before it says "…".
KEYS_SHOWN = 4


def load_state_dict_file(
    source: str | os.PathLike[str] | bytes, *, name: str | None = None, mmap: bool = False
) -> StateDict:
    """A file (or its bytes) holding a state dict → that dict, on the CPU.

    `mmap=True` maps the tensors instead of reading them (zip-format files only; older files
    are read as usual): a cheap way to check a file that something else will load.

    Raises `WeightsMissing` when the path does not exist and `WeightsCorrupt` when the file is
    not a PyTorch file, is damaged, or holds anything other than a mapping of names to tensors.
    """
    if isinstance(source, bytes):
        label = name or "weights data"
        stream: io.BytesIO | Path = io.BytesIO(source)
    else:
        stream = Path(source)
        label = name or stream.name
        if not stream.is_file():
            raise WeightsMissing(f"weights file {stream} does not exist", path=str(stream))
    try:
        use_mmap = mmap and isinstance(stream, Path) and zipfile.is_zipfile(stream)
        loaded = torch.load(stream, map_location="cpu", weights_only=True, mmap=use_mmap)
    except Exception as error:  # torch reports damage as many types (Unpickling, Runtime, EOF…)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise WeightsCorrupt(
            f"{label} is not a readable PyTorch weights file ({type(error).__name__}: {first_line})"
        ) from error
    if not isinstance(loaded, Mapping):
        raise WeightsCorrupt(f"{label} holds a {type(loaded).__name__}, not a state dict of tensors")
    not_tensors = [key for key, value in loaded.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise WeightsCorrupt(
            f"{label} is not a plain state dict: {len(not_tensors)} entries are not tensors "
            f"({_shown(map(str, not_tensors))})"
        )
    return dict(loaded)


@dataclass(frozen=True)
class KeyMismatch:
    missing: list[str]
    unexpected: list[str]
    #: key → (shape in the checkpoint, shape the module expects)
    wrong_shape: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape)

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"{_count(len(self.missing), 'missing key')} ({_shown(self.missing)})")
        if self.unexpected:
            parts.append(f"{_count(len(self.unexpected), 'unexpected key')} ({_shown(self.unexpected)})")
        if self.wrong_shape:
            shapes = [
                f"{key}: file {_shape(found)} vs. model {_shape(wanted)}"
                for key, (found, wanted) in self.wrong_shape.items()
            ]
            parts.append(f"{_count(len(shapes), 'shape mismatch', 'shape mismatches')} ({_shown(shapes)})")
        return "; ".join(parts)


def compare_keys(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> KeyMismatch:
    expected = module.state_dict()
    optional = _optional_keys(module)
    missing = [key for key in expected if key not in state_dict and key not in optional]
    unexpected = [key for key in state_dict if key not in expected]
    wrong_shape = {
        key: (tuple(state_dict[key].shape), tuple(expected[key].shape))
        for key in expected
        if key in state_dict and state_dict[key].shape != expected[key].shape
    }
    return KeyMismatch(missing, unexpected, wrong_shape)


def load_strict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "the checkpoint", assign: bool = False
) -> None:
    """Load `state_dict` into `module`, every key and shape matching, or raise `CheckpointMismatch`.

    BatchNorm's `num_batches_tracked` counters may be absent: files saved before PyTorch 0.4.1
    do not have them, and they play no part in inference.  `assign=True` adopts the tensors
    as they are (for a module built on the meta device).
    """
    mismatch = compare_keys(module, state_dict)
    if mismatch:
        raise CheckpointMismatch(f"{source} does not fit {type(module).__name__}: {mismatch.describe()}")
    complete = dict(state_dict)
    for key in _optional_keys(module):
        complete.setdefault(key, torch.zeros((), dtype=torch.long))
    module.load_state_dict(complete, strict=True, assign=assign)


def _optional_keys(module: nn.Module) -> set[str]:
    return {
        f"{name}.num_batches_tracked" if name else "num_batches_tracked"
        for name, child in module.named_modules()
        if isinstance(child, _BatchNorm) and child.track_running_stats
    }


def _shown(items: Iterable[str]) -> str:
    listed = list(items)
    head = ", ".join(listed[:KEYS_SHOWN])
    return head + (", …" if len(listed) > KEYS_SHOWN else "")


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n} {singular if n == 1 else (plural or singular + 's')}"


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"
