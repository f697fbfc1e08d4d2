"""What a weights file *declares*, read before anything it declares is allocated.

A weights file is untrusted input, and `torch.load(weights_only=True)` only keeps it from
running code.  It still allocates whatever the file declares: a 1 MB zip whose `data/0` entry
inflates to 1 GiB costs 1 GiB, a legacy file that declares 10^10 elements asks for 40 GB before
reading a byte, and meta, sparse or quantized tensors load "successfully" into a model that then
computes garbage or fails on every request.  So before `torch.load` sees a file, `scan_checkpoint`
reads what the file declares — for the zip format the central directory (each entry's
uncompressed size) and `data.pkl`, for the legacy format its pickle — without building a single
tensor, and checks what holds for any weights file, whatever model it is for:

- every storage must fit in the file itself (a zip entry may not inflate; a legacy storage's
  bytes must be there), so reading never costs more memory than the file's size;
- every value must be a plain dense tensor on an ordinary device, inside its storage.

What a *model* expects of the file (keys, shapes, dtypes, no spare storage bytes) and the load
itself are `inference.checkpoint`'s.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
import zipfile
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inference.errors import WeightsCorrupt, WeightsMissing

Source = str | os.PathLike[str] | bytes

#: How many keys of each kind a mismatch message names before it says "…".
KEYS_SHOWN = 4
#: The pickle of a zip checkpoint (`data.pkl`) names each tensor in ~100 bytes; this is far
#: above any real model's and keeps a hostile one from inflating without bound.
MAX_PICKLE_BYTES = 64 * 1024 * 1024
#: Devices a storage may have been saved from; `map_location="cpu"` brings each to the CPU.
#: "meta" (no data at all) is not among them.
_DEVICES = ("cpu", "cuda", "mps")

# The legacy format (torch.save before 1.6, `_use_new_zipfile_serialization=False`): four
# pickles (magic number, protocol version, system info, the object), a pickled list of storage
# keys, then each storage as an 8-byte little-endian element count followed by its bytes.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b"PK\x03\x04"

#: Storage classes a pickle names → the dtype of their elements.  The quantized ones are absent
#: on purpose: they are reported as quantized tensors.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}
#: torch's rebuild functions for tensors that are not plain dense ones → what to call them.
_OTHER_TENSOR_KINDS = {
    "_rebuild_sparse_tensor": "a sparse tensor",
    "_rebuild_sparse_csr": "a sparse tensor",
    "_rebuild_qtensor": "a quantized tensor",
    "_rebuild_meta_tensor_no_storage": "a meta tensor (it has no data)",
    "_rebuild_nested_tensor": "a nested tensor",
    "_rebuild_wrapper_subclass": "a tensor subclass",
    "_rebuild_device_tensor_from_numpy": "a tensor of an unusual device",
    "_rebuild_device_tensor_from_cpu_tensor": "a tensor of an unusual device",
    "_rebuild_xla_tensor": "a tensor of an unusual device",
    "_rebuild_mtia_tensor": "a tensor of an unusual device",
}


# --- the records: what a file declares --------------------------------------------------------


@dataclass(frozen=True)
class DeclaredStorage:
    key: str
    dtype: torch.dtype | None  # None: a quantized storage
    numel: int
    location: str

    @property
    def nbytes(self) -> int:
        return self.numel * _element_size(self.dtype)


@dataclass(frozen=True)
class DeclaredTensor:
    """A tensor as the file describes it; `kind` is None for a plain dense tensor."""

    shape: tuple[int, ...] = ()
    dtype: torch.dtype | None = None
    storage: DeclaredStorage | None = None
    offset: int = 0
    stride: tuple[int, ...] = ()
    kind: str | None = None

    @property
    def nbytes(self) -> int:
        numel = 1
        for extent in self.shape:
            numel *= extent
        return numel * _element_size(self.dtype)


@dataclass
class DeclaredCheckpoint:
    format: str  # "zip" or "legacy"
    file_bytes: int
    #: Key → the tensor, or the type name of a value that is not a tensor at all.
    tensors: dict[str, DeclaredTensor | str] = field(default_factory=dict)
    storages: dict[str, DeclaredStorage] = field(default_factory=dict)

    @property
    def storage_bytes(self) -> int:
        return sum(storage.nbytes for storage in self.storages.values())


def _element_size(dtype: torch.dtype | None) -> int:
    return 1 if dtype is None else dtype.itemsize


# --- reading a pickle without building anything -----------------------------------------------


class _Refused(ValueError):
    """Raised inside the scan; `scan_checkpoint` words it with the file's name."""


class _Opaque:
    """Whatever the scan does not model: a global, or the result of calling one.  Building it
    runs nothing, and it is refused later wherever a tensor was wanted."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> _Opaque:
        return _Opaque(self.name)

    def __setstate__(self, state: Any) -> None:
        pass


class _OtherTensor:
    """A torch rebuild function for a tensor that is not plain and dense: what it would make."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, *args: Any, **kwargs: Any) -> DeclaredTensor:
        return DeclaredTensor(kind=self.kind)


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = _STORAGE_DTYPES.get(name)


def _rebuild_tensor(storage: Any, offset: Any, shape: Any, stride: Any, *_rest: Any) -> DeclaredTensor:
    """Stands in for torch._utils._rebuild_tensor_v2: the arguments, checked and recorded."""
    if not isinstance(storage, DeclaredStorage):
        raise _Refused("a tensor without a storage of its own")
    if not (_are_counts((offset,)) and isinstance(shape, tuple) and isinstance(stride, tuple)):
        raise _Refused("a tensor whose shape or offset is not a list of whole numbers")
    if not (_are_counts(shape) and _are_counts(stride) and len(shape) == len(stride)):
        raise _Refused(f"a tensor of shape {shape} and strides {stride}")
    if storage.dtype is None:
        return DeclaredTensor(kind="a quantized tensor")
    return DeclaredTensor(tuple(shape), storage.dtype, storage, offset, tuple(stride))


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    return data  # an nn.Parameter is its tensor, as far as a state dict goes


def _are_counts(values: Iterable[Any]) -> bool:
    return all(isinstance(value, int) and not isinstance(value, bool) and value >= 0 for value in values)


class _ScanUnpickler(pickle.Unpickler):
    """Reads a checkpoint's pickle into `Declared…` records; builds no tensor, imports nothing
    but `collections.OrderedDict`.  (The real load afterwards is torch's `weights_only` one.)"""

    def __init__(self, file: io.BufferedIOBase, legacy: bool) -> None:
        super().__init__(file, encoding="utf-8")
        self.legacy = legacy
        self.storages: dict[str, DeclaredStorage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch._utils":
            if name == "_rebuild_tensor_v2":
                return _rebuild_tensor
            if name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
                return _rebuild_parameter
            if name.startswith("_rebuild_"):
                return _OtherTensor(_OTHER_TENSOR_KINDS.get(name, f"a tensor built by {name}"))
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        return _Opaque(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> DeclaredStorage:
        fields = 6 if self.legacy else 5  # legacy ids add the view of a storage
        if not (isinstance(pid, tuple) and len(pid) == fields and pid[0] == "storage"):
            raise _Refused(f"a persistent id {str(pid)[:60]} that is not a storage")
        storage_type, key, location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise _Refused("a storage of no known type")
        if not (isinstance(key, str) and isinstance(location, str) and _are_counts((numel,))):
            raise _Refused(f"a storage declared as {str(pid[1:5])[:80]}")
        if self.legacy and pid[5] is not None:
            raise _Refused("a storage view (a format older than PyTorch 0.4)")
        if storage_type.dtype is None and "QInt" not in storage_type.name and "QUInt" not in storage_type.name:
            raise _Refused(f"a storage of type {storage_type.name}")
        if key in self.storages:
            return self.storages[key]  # torch keeps the first declaration of a key too
        storage = DeclaredStorage(key, storage_type.dtype, numel, location)
        self.storages[key] = storage
        return storage


# --- the scan ---------------------------------------------------------------------------------


def scan_checkpoint(source: Source, *, name: str | None = None) -> DeclaredCheckpoint:
    """What a checkpoint declares (tensors, storages), read without allocating any of it.

    Raises `WeightsMissing` for a path that does not exist and `WeightsCorrupt` for a file that
    is not a PyTorch checkpoint, or whose storages would need more memory than the file holds.
    """
    label, stream = _open(source, name)
    with stream:
        file_bytes = stream.seek(0, io.SEEK_END)
        stream.seek(0)
        try:
            if stream.read(4) == _ZIP_MAGIC:
                declared = _scan_zip(stream, file_bytes)
            else:
                declared = _scan_legacy(stream, file_bytes)
        except _Refused as error:
            raise WeightsCorrupt(f"{label} holds {error}; refusing to load it") from None
        except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError,
                IndexError, KeyError, AttributeError, RecursionError, struct.error, OSError) as error:
            raise WeightsCorrupt(f"{label} is not a readable PyTorch weights file ({type(error).__name__})") from None
    _check_declared(declared, label)
    return declared


def _open(source: Source, name: str | None) -> tuple[str, io.BufferedIOBase]:
    if isinstance(source, bytes):
        return name or "weights data", io.BytesIO(source)
    path = Path(source)
    if not path.is_file():
        raise WeightsMissing(f"weights file {path} does not exist", path=str(path))
    return name or path.name, open(path, "rb")


def _scan_zip(stream: io.BufferedIOBase, file_bytes: int) -> DeclaredCheckpoint:
    stream.seek(0)
    with zipfile.ZipFile(stream) as archive:
        entries = archive.infolist()
        names = [entry.filename for entry in entries]
        if len(set(names)) != len(names):
            # Two entries of one name: Python's zipfile and torch's reader might pick different ones.
            raise _Refused("two zip entries of the same name")
        # Every entry is read by torch in full (data.pkl, version, byteorder, the storages), so
        # together they must fit in the file: stored, not inflated.
        declared_bytes = sum(entry.file_size for entry in entries)
        if declared_bytes > file_bytes:
            raise _Refused(
                f"zip entries that inflate to {declared_bytes:,} bytes from a file of {file_bytes:,} "
                "(torch.save never compresses them)"
            )
        pickles = [entry for entry in entries if entry.filename.endswith("/data.pkl")]
        if len(pickles) != 1 or pickles[0].file_size > MAX_PICKLE_BYTES:
            raise _Refused("no single data.pkl of a sensible size")
        prefix = pickles[0].filename[: -len("data.pkl")]
        with archive.open(pickles[0]) as data_pkl:
            scanner = _ScanUnpickler(data_pkl, legacy=False)
            loaded = scanner.load()
        sizes = {entry.filename: entry.file_size for entry in entries}
    for storage in scanner.storages.values():
        entry = f"{prefix}data/{storage.key}"
        if sizes.get(entry) != storage.nbytes:
            raise _Refused(
                f"storage {storage.key} declared as {storage.nbytes:,} bytes in data.pkl "
                f"but {sizes.get(entry, 'absent')} in the zip"
            )
    return _declared("zip", file_bytes, loaded, scanner.storages)


def _scan_legacy(stream: io.BufferedIOBase, file_bytes: int) -> DeclaredCheckpoint:
    # torch.load tries the tar format of PyTorch < 0.1.10 before this one: a file that passes
    # for both would be read as a tar, unscanned.  No file this project reads is that old.
    stream.seek(0)
    try:
        tarfile.open(fileobj=stream, mode="r:").close()
    except tarfile.TarError:
        pass
    else:
        raise _Refused("a tar archive (the format of PyTorch before 0.1.10, not read here)")
    stream.seek(0)
    header = _ScanUnpickler(stream, legacy=True)
    if header.load() != _LEGACY_MAGIC or header.load() != _LEGACY_PROTOCOL:
        raise _Refused("no PyTorch checkpoint (neither the zip nor the legacy format)")
    header.load()  # system info: byte order, type sizes
    scanner = _ScanUnpickler(stream, legacy=True)
    loaded = scanner.load()
    keys = _ScanUnpickler(stream, legacy=True).load()
    if not (isinstance(keys, list) and set(keys) == set(scanner.storages) and len(keys) == len(set(keys))):
        raise _Refused("a list of storages that does not match its tensors")
    # The storages follow, in the order of `keys`: walk their headers without reading the data.
    position = stream.tell()
    for key in keys:
        storage = scanner.storages[key]
        stream.seek(position)
        count = stream.read(8)
        if len(count) < 8 or struct.unpack("<q", count)[0] != storage.numel:
            raise _Refused(f"storage {key} whose size in the file differs from its declaration")
        position += 8 + storage.nbytes
        if position > file_bytes:
            raise _Refused(
                f"storages declared as {sum(s.nbytes for s in scanner.storages.values()):,} bytes "
                f"in a file of {file_bytes:,}"
            )
    return _declared("legacy", file_bytes, loaded, scanner.storages)


def _declared(format: str, file_bytes: int, loaded: Any, storages: dict[str, DeclaredStorage]) -> DeclaredCheckpoint:
    if not isinstance(loaded, dict):
        raise _Refused(f"a {type(loaded).__name__}, not a state dict of tensors")
    tensors: dict[str, DeclaredTensor | str] = {}
    for key, value in loaded.items():
        if not isinstance(key, str):
            raise _Refused(f"a key {str(key)[:40]} that is not a name")
        tensors[key] = value if isinstance(value, DeclaredTensor) else _type_name(value)
    return DeclaredCheckpoint(format, file_bytes, tensors, dict(storages))


def _type_name(value: Any) -> str:
    return value.name if isinstance(value, _Opaque) else type(value).__name__


def _check_declared(declared: DeclaredCheckpoint, label: str) -> None:
    """What holds for any weights file, whatever model it is for."""
    not_tensors = [f"{key}: {tensor}" for key, tensor in declared.tensors.items() if isinstance(tensor, str)]
    if not_tensors:
        raise WeightsCorrupt(
            f"{label} is not a plain state dict: {len(not_tensors)} entries are not tensors ({shown(not_tensors)})"
        )
    for key, tensor in declared.tensors.items():
        assert isinstance(tensor, DeclaredTensor)
        if tensor.kind is not None:
            raise WeightsCorrupt(f"{label}: tensor {key} is {tensor.kind}; only plain dense tensors are loaded")
        assert tensor.storage is not None
        device = tensor.storage.location.split(":", 1)[0]
        if device not in _DEVICES:
            raise WeightsCorrupt(
                f"{label}: tensor {key} is stored on the {tensor.storage.location!r} device"
                + (" (a meta tensor: it has no data)" if device == "meta" else "")
            )
        if tensor.nbytes and _last_element(tensor) >= tensor.storage.numel:
            raise WeightsCorrupt(f"{label}: tensor {key} reaches past the end of its storage")


def _last_element(tensor: DeclaredTensor) -> int:
    return tensor.offset + sum((extent - 1) * step for extent, step in zip(tensor.shape, tensor.stride))


def shown(items: Iterable[str]) -> str:
    """The first `KEYS_SHOWN` of `items`, comma-separated, and "…" if there are more."""
    listed = list(items)
    head = ", ".join(listed[:KEYS_SHOWN])
    return head + (", …" if len(listed) > KEYS_SHOWN else "")
