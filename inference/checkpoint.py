"""Loading a weights file into a model: strictly, and checked against the model before it is read.

The order of a load (`load_checkpoint`):

1. `scan_checkpoint` (`inference.checkpoint_scan`) reads what the file *declares* without
   allocating any of it, and refuses what no weights file may hold (storages larger than the
   file, tensors that are not plain and dense, devices with no data);
2. `check_declared_against` compares those declarations with the model: every key, shape and
   dtype must be what the model expects, and the storages may hold no more bytes than those
   tensors need — so a wrong or hostile file is refused before it costs any memory;
3. `torch.load(weights_only=True)` reads it, and `load_strict` compares keys, shapes, dtypes
   and kinds once more on the tensors themselves (for callers that hand it a dict of their own).

The scan's names (`scan_checkpoint`, `Declared…`) are importable from here as well, so callers
need one module for weights files.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from inference.checkpoint_scan import (
    KEYS_SHOWN,
    MAX_PICKLE_BYTES,
    DeclaredCheckpoint,
    DeclaredStorage,
    DeclaredTensor,
    Source,
    scan_checkpoint,
    shown,
)
from inference.errors import CheckpointMismatch, WeightsCorrupt

__all__ = [
    "KEYS_SHOWN",
    "MAX_PICKLE_BYTES",
    "DeclaredCheckpoint",
    "DeclaredStorage",
    "DeclaredTensor",
    "KeyMismatch",
    "Source",
    "StateDict",
    "check_declared_against",
    "compare_keys",
    "load_checkpoint",
    "load_state_dict_file",
    "load_strict",
    "scan_checkpoint",
]

StateDict = dict[str, torch.Tensor]


# --- what a model expects ---------------------------------------------------------------------


@dataclass(frozen=True)
class KeyMismatch:
    missing: list[str]
    unexpected: list[str]
    #: key → (shape in the checkpoint, shape the module expects)
    wrong_shape: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    #: key → (dtype in the checkpoint, dtype the module expects)
    wrong_dtype: dict[str, tuple[torch.dtype, torch.dtype]] = field(default_factory=dict)
    #: key → what the tensor is instead of a plain dense one ("a sparse tensor", …)
    wrong_kind: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape or self.wrong_dtype or self.wrong_kind)

    def describe(self) -> str:
        parts = []
        if self.wrong_kind:
            kinds = [f"{key} is {kind}" for key, kind in self.wrong_kind.items()]
            parts.append(f"{_count(len(kinds), 'tensor')} not plain and dense ({shown(kinds)})")
        if self.missing:
            parts.append(f"{_count(len(self.missing), 'missing key')} ({shown(self.missing)})")
        if self.unexpected:
            parts.append(f"{_count(len(self.unexpected), 'unexpected key')} ({shown(self.unexpected)})")
        if self.wrong_shape:
            shapes = [
                f"{key}: file {_shape(found)} vs. model {_shape(wanted)}"
                for key, (found, wanted) in self.wrong_shape.items()
            ]
            parts.append(f"{_count(len(shapes), 'shape mismatch', 'shape mismatches')} ({shown(shapes)})")
        if self.wrong_dtype:
            dtypes = [
                f"{key}: file {_dtype(found)} vs. model {_dtype(wanted)}"
                for key, (found, wanted) in self.wrong_dtype.items()
            ]
            parts.append(f"{_count(len(dtypes), 'dtype mismatch', 'dtype mismatches')} ({shown(dtypes)})")
        return "; ".join(parts)


def _compare(
    expected: Mapping[str, torch.Tensor],
    optional: set[str],
    found: Mapping[str, tuple[tuple[int, ...], torch.dtype | None, str | None]],
) -> KeyMismatch:
    """Keys, shapes, dtypes and kinds of `found` (key → (shape, dtype, kind)) against a module's."""
    wrong_kind = {key: kind for key, (_, _, kind) in found.items() if kind is not None and key in expected}
    missing = [key for key in expected if key not in found and key not in optional]
    unexpected = [key for key in found if key not in expected]
    comparable = [key for key in expected if key in found and key not in wrong_kind]
    wrong_shape = {
        key: (found[key][0], tuple(expected[key].shape))
        for key in comparable
        if found[key][0] != tuple(expected[key].shape)
    }
    wrong_dtype = {
        key: (found[key][1], expected[key].dtype)
        for key in comparable
        if found[key][1] != expected[key].dtype
    }
    return KeyMismatch(missing, unexpected, wrong_shape, wrong_dtype, wrong_kind)


def compare_keys(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> KeyMismatch:
    """Keys, shapes, dtypes and kinds of the tensors of `state_dict` against `module`'s own."""
    found = {key: (tuple(value.shape), value.dtype, _tensor_kind(value)) for key, value in state_dict.items()}
    return _compare(module.state_dict(), _optional_keys(module), found)


def _tensor_kind(tensor: torch.Tensor) -> str | None:
    if tensor.layout != torch.strided:
        return "a sparse tensor"
    if tensor.is_quantized:
        return "a quantized tensor"
    if tensor.is_meta:
        return "a meta tensor (it has no data)"
    if type(tensor) not in (torch.Tensor, nn.Parameter):
        return f"a {type(tensor).__name__}"
    return None


def check_declared_against(
    module: nn.Module, declared: DeclaredCheckpoint, *, source: str, ignore: Callable[[str], bool] | None = None
) -> None:
    """Raise `CheckpointMismatch` unless the file declares exactly the tensors `module` needs
    (keys, shapes, dtypes), and `WeightsCorrupt` if its storages hold more bytes than those."""
    tensors = {
        key: tensor
        for key, tensor in declared.tensors.items()
        if isinstance(tensor, DeclaredTensor) and not (ignore and ignore(key))
    }
    found = {key: (tensor.shape, tensor.dtype, tensor.kind) for key, tensor in tensors.items()}
    mismatch = _compare(module.state_dict(), _optional_keys(module), found)
    if mismatch:
        raise CheckpointMismatch(f"{source} does not fit {type(module).__name__}: {mismatch.describe()}")
    # The tensors now have the model's shapes; their storages may hold no more than they need.
    # (Ignored keys count at their own size.)
    needed = sum(tensor.nbytes for tensor in declared.tensors.values() if isinstance(tensor, DeclaredTensor))
    if declared.storage_bytes > needed:
        biggest = max(
            (t for t in declared.tensors.values() if isinstance(t, DeclaredTensor) and t.storage is not None),
            key=lambda t: t.storage.nbytes - t.nbytes,
        )
        key = next(k for k, t in declared.tensors.items() if t is biggest)
        raise WeightsCorrupt(
            f"{source}: its storages hold {declared.storage_bytes:,} bytes where its tensors need "
            f"{needed:,} (tensor {key} sits in a storage of {biggest.storage.nbytes:,} bytes for its "
            f"{biggest.nbytes:,})"
        )


# --- loading ----------------------------------------------------------------------------------


def load_state_dict_file(source: Source, *, name: str | None = None, mmap: bool = False) -> StateDict:
    """A file (or its bytes) holding a state dict → that dict, on the CPU.

    The file is scanned first (`scan_checkpoint`): nothing it declares is allocated unless it
    fits in the file and is a plain dense tensor.  `mmap=True` maps the tensors instead of
    reading them (zip-format files only; older files are read as usual): a cheap way to check a
    file that something else will load.

    Raises `WeightsMissing` when the path does not exist and `WeightsCorrupt` when the file is
    not a PyTorch file, is damaged, or holds anything other than a mapping of names to tensors.
    """
    declared = scan_checkpoint(source, name=name)
    return _torch_load(source, name, mmap=mmap and declared.format == "zip")


def load_checkpoint(
    module: nn.Module,
    source: Source,
    *,
    name: str | None = None,
    assign: bool = False,
    ignore: Callable[[str], bool] | None = None,
) -> None:
    """Check a weights file against `module` before reading it, then load it strictly.

    The one loader for a model's own weights: keys, shapes and dtypes are compared with the
    model's while the file is only scanned, so a wrong or hostile file costs no memory.  Keys
    for which `ignore(key)` is true may be in the file and are dropped (CycleGAN's stale
    InstanceNorm statistics).  `assign=True` adopts the file's tensors (a module on "meta").
    """
    label = name or ("weights data" if isinstance(source, bytes) else Path(source).name)
    declared = scan_checkpoint(source, name=label)
    check_declared_against(module, declared, source=label, ignore=ignore)
    state_dict = _torch_load(source, label, mmap=False)
    if ignore is not None:
        state_dict = {key: value for key, value in state_dict.items() if not ignore(key)}
    load_strict(module, state_dict, source=label, assign=assign)


def _torch_load(source: Source, name: str | None, *, mmap: bool) -> StateDict:
    label = name or ("weights data" if isinstance(source, bytes) else Path(source).name)
    stream = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
    try:
        loaded = torch.load(stream, map_location="cpu", weights_only=True, mmap=mmap)
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
            f"({shown(map(str, not_tensors))})"
        )
    return dict(loaded)


def load_strict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "the checkpoint", assign: bool = False
) -> None:
    """Load `state_dict` into `module`, every key, shape and dtype matching, or raise `CheckpointMismatch`.

    Only plain dense tensors are accepted (not meta, sparse or quantized ones), each of the
    module's own dtype: `load_state_dict` would cast a float16 file quietly, and with
    `assign=True` adopt it, leaving a model that fails on every input.  BatchNorm's
    `num_batches_tracked` counters may be absent: files saved before PyTorch 0.4.1 do not have
    them, and they play no part in inference.  `assign=True` adopts the tensors as they are
    (for a module built on the meta device).
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


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n} {singular if n == 1 else (plural or singular + 's')}"


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _dtype(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.")
