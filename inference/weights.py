"""Every weights file the project downloads: where it is published, where it lives, how it is fetched.

`CATALOGUE` names each model's files (the published checkpoints: their sources, integrity ids and layouts); `WeightsStore` maps them to paths
under one weights directory and fetches them on request.

Integrity: every file the book's repositories publish is checked against its **git blob id**
(what `git hash-object FILE` prints), which catches truncated and tampered downloads without any
hash published elsewhere.  The CycleGAN authors' zoo publishes no id; those downloads are
checked against their Content-Length only, and `status` says so.

Atomicity: a download goes to a hidden temp file in the target's directory, is fsynced and
verified, then `os.replace`d onto the final path.  A half-written, interrupted or corrupt
download is never at the final path; the temp file is removed on every failure.

A file that is already present is trusted as is (re-hashing 170 MB at every model load would
cost more than it protects against); `status(verify=True)` / `weights list --verify` re-checks.

Joined files (the captioner's `resnet101.pth` is published as two byte halves): each part is
downloaded and verified on its own, then the parts are concatenated, in order, into the final
file (atomically, as above), and the parts are deleted — keeping them would double the disk
use for no benefit.  The joined file has no id of its own, so once the parts are gone
`status(verify=True)` cannot re-check it.  Parts placed by hand are verified before joining,
which happens on first use without any network access.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.client
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import TYPE_CHECKING, BinaryIO

from tqdm import tqdm

from inference.errors import ModelUnavailable, WeightsCorrupt, WeightsMissing

if TYPE_CHECKING:
    from config import Settings

DOWNLOAD_COMMAND = "python -m inference weights download {name}"
USER_AGENT = "discord-vision-bot-weights/1.0 (+urllib)"
_CHUNK_BYTES = 1 << 20
_BLOB_ID = re.compile(r"[0-9a-f]{40}")
_ALLOWED_SCHEMES = ("http", "https")


# ---------------------------------------------------------------------------------------------
# What the files are
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsFile:
    #: Path inside the weights directory, always with forward slashes.
    relpath: str
    #: Where it is published; None for a file assembled from `parts`.
    url: str | None
    #: Git blob id of the published bytes; None when none is published.
    blob_id: str | None
    #: Concatenated in this order to make this file.
    parts: tuple[WeightsFile, ...] = ()
    size_hint: int | None = None

    def __post_init__(self) -> None:
        path = PurePosixPath(self.relpath)
        if not self.relpath or path.is_absolute() or ".." in path.parts or "\\" in self.relpath:
            raise ValueError(f"weights path must be relative, without '..': {self.relpath!r}")
        if self.blob_id is not None and not _BLOB_ID.fullmatch(self.blob_id):
            raise ValueError(f"not a git blob id (40 lowercase hex digits): {self.blob_id!r}")
        if self.parts:
            if self.url is not None:
                raise ValueError(f"{self.relpath}: a joined file has parts, not a URL")
            if any(part.parts for part in self.parts):
                raise ValueError(f"{self.relpath}: parts cannot have parts of their own")
        elif self.url is None:
            raise ValueError(f"{self.relpath}: needs a URL or parts")
        else:
            _check_url(self.url)

    @property
    def name(self) -> str:
        return PurePosixPath(self.relpath).name

    @property
    def urls(self) -> tuple[str, ...]:
        """Where its bytes come from: its URL, or its parts' URLs in order."""
        if self.parts:
            return tuple(part.url for part in self.parts if part.url is not None)
        return (self.url,) if self.url is not None else ()

    @property
    def integrity(self) -> str:
        """How a download of it is checked, in words (for `status` and `weights list`)."""
        if self.parts:
            return "parts' blob ids" if all(p.blob_id for p in self.parts) else "none published"
        return "git blob id" if self.blob_id else "none published"


@dataclass(frozen=True)
class ModelWeights:
    name: str
    #: role → file.  Roles: CycleGAN generators → "generator"; the captioner "fc" →
    #: "model" (fc-model.pth), "infos" (fc-infos.pkl), "encoder" (resnet101.pth).
    files: Mapping[str, WeightsFile]
    description: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))


def _check_url(url: str) -> None:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in _ALLOWED_SCHEMES or not parsed.netloc:
        raise ValueError(f"only http(s) URLs can be downloaded, not {url!r}")


_DLWPT = "https://github.com/deep-learning-with-pytorch/dlwpt-code/raw/master/"
_CAPTIONING = "https://github.com/deep-learning-with-pytorch/ImageCaptioning.pytorch/raw/master/"
#: The zoo of junyanz/pytorch-CycleGAN-and-pix2pix (scripts/download_cyclegan_model.sh).  The
#: authors publish it over plain http and without checksums; `weights_only` loading is what
#: keeps a tampered file from running code.
_CYCLEGAN_ZOO = "http://efrosgans.eecs.berkeley.edu/cyclegan/pretrained_models/"
#: Zoo generators with the book's layout.  The zoo's own `horse2zebra` is left out: the name
#: belongs to the book's copy, which has a published blob id.
_ZOO_GENERATORS: dict[str, str] = {
    "zebra2horse": "zebra → horse",
    "apple2orange": "apple → orange",
    "orange2apple": "orange → apple",
    "summer2winter_yosemite": "Yosemite summer → winter",
    "winter2summer_yosemite": "Yosemite winter → summer",
    "monet2photo": "Monet painting → photo",
    "style_monet": "photo → Monet style",
    "style_cezanne": "photo → Cézanne style",
    "style_ukiyoe": "photo → ukiyo-e style",
    "style_vangogh": "photo → Van Gogh style",
    "sat2map": "satellite photo → map",
    "map2sat": "map → satellite photo",
    "cityscapes_photo2label": "street photo → Cityscapes label colours",
    "cityscapes_label2photo": "Cityscapes label colours → street photo",
    "facades_photo2label": "facade photo → label colours",
    "facades_label2photo": "facade label colours → photo",
    "iphone2dslr_flower": "phone flower photo → DSLR shallow depth of field",
}


def _build_catalogue() -> Mapping[str, ModelWeights]:
    models = [
        ModelWeights(
            name="horse2zebra",
            files={
                "generator": WeightsFile(
                    relpath="cyclegan/horse2zebra_0.4.0.pth",
                    url=_DLWPT + "data/p1ch2/horse2zebra_0.4.0.pth",
                    blob_id="ce10268a67fba8227bd42a071e17eef1b358fa2b",
                )
            },
            description="CycleGAN horse → zebra generator, the book's copy (dlwpt-code)",
        ),
        ModelWeights(
            name="fc",
            files={
                "model": WeightsFile(
                    relpath="captioner/fc-model.pth",
                    url=_CAPTIONING + "data/FC/fc-model.pth",
                    blob_id="cd0073c00d1c1809e25e0ae794d5c58beec707d6",
                ),
                "infos": WeightsFile(
                    relpath="captioner/fc-infos.pkl",
                    url=_CAPTIONING + "data/FC/fc-infos.pkl",
                    blob_id="623f78e01e9b0dd95a130b5766e6651328939f29",
                ),
                "encoder": WeightsFile(
                    relpath="captioner/resnet101.pth",
                    url=None,
                    blob_id=None,
                    parts=(
                        WeightsFile(
                            relpath="captioner/resnet101a.pth",
                            url=_CAPTIONING + "data/imagenet_weights/resnet101a.pth",
                            blob_id="2933b934efa86e68cecf59fbad1072e16455b3ab",
                        ),
                        WeightsFile(
                            relpath="captioner/resnet101b.pth",
                            url=_CAPTIONING + "data/imagenet_weights/resnet101b.pth",
                            blob_id="76aed7cfbdc096666152d6c80069e28be37b9acd",
                        ),
                    ),
                ),
            },
            description="NeuralTalk2-style FC captioner + its Caffe ResNet-101 encoder "
            "(ImageCaptioning.pytorch, the book's fork)",
        ),
    ]
    for name, what in _ZOO_GENERATORS.items():
        models.append(
            ModelWeights(
                name=name,
                files={
                    "generator": WeightsFile(
                        relpath=f"cyclegan/{name}.pth", url=f"{_CYCLEGAN_ZOO}{name}.pth", blob_id=None
                    )
                },
                description=f"CycleGAN {what} generator (the CycleGAN authors' model zoo)",
            )
        )
    return MappingProxyType({model.name: model for model in models})


CATALOGUE: Mapping[str, ModelWeights] = _build_catalogue()


# ---------------------------------------------------------------------------------------------
# Git blob ids
# ---------------------------------------------------------------------------------------------


def git_blob_id(path_or_bytes: bytes | bytearray | memoryview | str | os.PathLike[str]) -> str:
    """The id `git hash-object` gives these bytes / this file (files are read in chunks)."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        view = memoryview(path_or_bytes)
        digest = hashlib.sha1(b"blob %d\0" % view.nbytes)
        digest.update(view)
        return digest.hexdigest()
    with open(path_or_bytes, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        digest = hashlib.sha1(b"blob %d\0" % size)
        read = 0
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
            read += len(chunk)
        if read != size:
            raise OSError(f"{os.fspath(path_or_bytes)} changed size while being hashed")
        return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Status
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsFileStatus:
    role: str
    file: WeightsFile
    path: Path
    present: bool
    #: Bytes on disk; None when missing.
    size: int | None
    #: True/False when checked against a published id; None when not checked or not checkable.
    verified: bool | None
    #: One line for people: what is known about integrity, parts waiting to be joined…
    note: str

    @property
    def state(self) -> str:
        if not self.present:
            return "missing"
        if self.verified is False:
            return "CORRUPT"
        return "verified" if self.verified else "present"


@dataclass(frozen=True)
class ModelWeightsStatus:
    name: str
    description: str
    files: tuple[WeightsFileStatus, ...]

    @property
    def complete(self) -> bool:
        return all(f.present for f in self.files)


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// too; a weights download follows only http(s)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if urllib.parse.urlsplit(newurl).scheme not in _ALLOWED_SCHEMES:
            raise urllib.error.HTTPError(
                newurl, code, f"redirect to a non-http(s) URL refused: {newurl}", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class WeightsStore:
    """The weights directory: paths of catalogue files, and fetching the missing ones."""

    def __init__(
        self,
        root: Path,
        *,
        auto_download: bool = False,
        progress: bool = True,
        catalogue: Mapping[str, ModelWeights] = CATALOGUE,
        timeout: float = 30.0,
    ) -> None:
        self.root = Path(root).expanduser()
        self.auto_download = auto_download
        self.progress = progress
        self.catalogue = catalogue
        #: Seconds for connecting and for each read; a stalled download fails after this.
        self.timeout = timeout
        self._opener = urllib.request.build_opener(_HttpOnlyRedirects)

    @classmethod
    def from_settings(cls, settings: Settings, **options: object) -> WeightsStore:
        options.setdefault("auto_download", settings.auto_download)
        return cls(settings.weights_dir, **options)  # type: ignore[arg-type]

    # --- where things are ------------------------------------------------------------------
    def path(self, file: WeightsFile) -> Path:
        return self.root.joinpath(*PurePosixPath(file.relpath).parts)

    def is_present(self, file: WeightsFile) -> bool:
        return self.path(file).is_file()

    def model(self, name: str) -> ModelWeights:
        try:
            return self.catalogue[name]
        except KeyError:
            known = ", ".join(sorted(self.catalogue))
            raise ModelUnavailable(f"no weights known for model {name!r}; known: {known}") from None

    # --- getting files ---------------------------------------------------------------------
    def ensure(self, file: WeightsFile) -> Path:
        """Its path, once it is there: present → as is; parts on disk → joined (offline);
        otherwise downloaded when `auto_download`, else `WeightsMissing`."""
        target = self.path(file)
        if target.is_file():
            return target
        if file.parts:
            missing = [part for part in file.parts if not self.is_present(part)]
            if missing and not self.auto_download:
                raise self._missing(file)
            fetched = {part.relpath for part in missing}
            for part in missing:
                self._fetch(part)
            return self._join(file, already_verified=fetched)
        if not self.auto_download:
            raise self._missing(file)
        return self._fetch(file)

    def ensure_model(self, name: str) -> dict[str, Path]:
        """role → path of every file of the model (fetching as `ensure` does)."""
        return {role: self.ensure(file) for role, file in self.model(name).files.items()}

    def download(self, file: WeightsFile) -> Path:
        """Fetch it again whether present or not (parts first, then the join)."""
        if file.parts:
            for part in file.parts:
                self._fetch(part)
            return self._join(file, already_verified={part.relpath for part in file.parts})
        return self._fetch(file)

    def download_model(self, name: str) -> dict[str, Path]:
        return {role: self.download(file) for role, file in self.model(name).files.items()}

    # --- status ----------------------------------------------------------------------------
    def status(self, *, verify: bool = False) -> list[ModelWeightsStatus]:
        """Per model, each file: present or missing, size, path; with `verify`, every present
        file with a published blob id is re-hashed and compared."""
        return [
            ModelWeightsStatus(
                name=model.name,
                description=model.description,
                files=tuple(
                    self._file_status(role, file, verify=verify)
                    for role, file in model.files.items()
                ),
            )
            for model in self.catalogue.values()
        ]

    def _file_status(self, role: str, file: WeightsFile, *, verify: bool) -> WeightsFileStatus:
        path = self.path(file)
        try:
            size: int | None = path.stat().st_size if path.is_file() else None
        except OSError:
            size = None
        present = size is not None
        verified: bool | None = None
        if file.parts:
            names = " + ".join(part.name for part in file.parts)
            note = f"joined from {names}; no id of its own, the parts' ids are checked before joining"
            if not present:
                on_disk = sum(self.is_present(part) for part in file.parts)
                if on_disk:
                    note += f"; {on_disk}/{len(file.parts)} parts on disk"
        elif file.blob_id is None:
            note = "no published blob id: only the download's length is checked"
        else:
            note = f"git blob id {file.blob_id}"
            if present and verify:
                actual = git_blob_id(path)
                verified = actual == file.blob_id
                if not verified:
                    note = f"blob id {actual}, expected {file.blob_id}: re-download it"
        return WeightsFileStatus(role, file, path, present, size, verified, note)

    # --- internals -------------------------------------------------------------------------
    def _owner(self, file: WeightsFile) -> str | None:
        for model in self.catalogue.values():
            for candidate in model.files.values():
                if candidate == file or file in candidate.parts:
                    return model.name
        return None

    def _command(self, file: WeightsFile) -> str:
        return DOWNLOAD_COMMAND.format(name=self._owner(file) or "all")

    def _missing(self, file: WeightsFile) -> WeightsMissing:
        target = self.path(file)
        owner = self._owner(file)
        of_model = f" (model {owner})" if owner else ""
        if file.parts:
            by_hand = "; or download " + ", ".join(
                f"{part.url} to {self.path(part)}" for part in file.parts
            ) + " (they are joined on first use)"
        else:
            by_hand = f"; or download {file.url} to that path by hand"
        return WeightsMissing(
            f"weights file {file.relpath}{of_model} is missing: it goes at {target}. "
            f"Fetch it with `{self._command(file)}`{by_hand}",
            str(target),
            " ".join(file.urls),
        )

    def _download_failed(self, file: WeightsFile, reason: str) -> WeightsMissing:
        target = self.path(file)
        return WeightsMissing(
            f"could not download {file.relpath} from {file.url}: {reason}. "
            f"Nothing was saved at {target}; download it there by hand, "
            f"or retry `{self._command(file)}` when online",
            str(target),
            file.url or "",
        )

    def _fetch(self, file: WeightsFile) -> Path:
        """Download one URL-backed file to its final path: temp file → verify → replace."""
        target = self.path(file)
        # Connect first: an unreachable server leaves no trace in the weights directory.
        with self._open(file) as response, self._temp_file_for(target) as (out, temp):
            self._copy(file, response, out, temp)
            out.flush()  # the check reads the file back from disk
            self._verify_download(file, temp)
        return target

    def _open(self, file: WeightsFile) -> http.client.HTTPResponse:
        assert file.url is not None, "joined files are built by _join"
        _check_url(file.url)
        request = urllib.request.Request(file.url, headers={"User-Agent": USER_AGENT})
        try:
            return self._opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            error.close()
            raise self._download_failed(file, f"HTTP {error.code} {error.reason}") from None
        except urllib.error.URLError as error:
            raise self._download_failed(file, _reason(error.reason)) from None
        except (OSError, http.client.HTTPException) as error:
            raise self._download_failed(file, _reason(error)) from None

    def _copy(
        self, file: WeightsFile, response: http.client.HTTPResponse, out: BinaryIO, temp: Path
    ) -> None:
        expected = _content_length(response)
        received = 0
        with tqdm(
            total=expected,
            desc=file.name,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            disable=not self.progress,
            dynamic_ncols=True,
        ) as bar:
            while True:
                try:
                    chunk = response.read(_CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as error:
                    # http.client raises IncompleteRead, the socket resets or times out.
                    raise self._download_failed(
                        file, f"the connection broke after {received} bytes ({_reason(error)})"
                    ) from None
                if not chunk:
                    break
                _write(out, chunk, temp)
                received += len(chunk)
                bar.update(len(chunk))
        # http.client returns a short body without complaint when the server closes early;
        # the declared length is the check for files without a published blob id.
        if expected is not None and received != expected:
            raise self._download_failed(
                file, f"the download was cut short: {received} of {expected} bytes arrived"
            )

    def _verify_download(self, file: WeightsFile, temp: Path) -> None:
        if file.blob_id is None:
            return
        actual = git_blob_id(temp)
        if actual != file.blob_id:
            raise WeightsCorrupt(
                f"download of {file.relpath} from {file.url} does not match its published "
                f"git blob id: expected {file.blob_id}, got {actual} "
                f"({temp.stat().st_size} bytes); nothing was saved at {self.path(file)}"
            )

    def _verify_on_disk(self, file: WeightsFile) -> None:
        """A file that someone else put there (a part placed by hand) — check before use."""
        if file.blob_id is None:
            return
        path = self.path(file)
        actual = git_blob_id(path)
        if actual != file.blob_id:
            raise WeightsCorrupt(
                f"{path} does not match the published git blob id of {file.relpath}: expected "
                f"{file.blob_id}, got {actual}; delete it or run `{self._command(file)}`"
            )

    def _join(self, file: WeightsFile, *, already_verified: set[str]) -> Path:
        target = self.path(file)
        try:
            for part in file.parts:
                if part.relpath not in already_verified:
                    self._verify_on_disk(part)
            with self._temp_file_for(target) as (out, temp):
                for part in file.parts:
                    with open(self.path(part), "rb") as source:
                        shutil.copyfileobj(source, out, _CHUNK_BYTES)
        except FileNotFoundError:
            # Another process joined the same file a moment ago and removed the parts.
            if target.is_file():
                return target
            raise self._missing(file) from None
        for part in file.parts:
            self.path(part).unlink(missing_ok=True)
        return target

    @staticmethod
    def _temp_file_for(target: Path) -> _AtomicFile:
        return _AtomicFile(target)


class _AtomicFile:
    """`with _AtomicFile(target) as (stream, temp_path):` — a temp file next to `target` that
    replaces it (fsynced) when the block succeeds and is removed when it raises."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self._stream: BinaryIO | None = None
        self._temp: Path | None = None

    def __enter__(self) -> tuple[BinaryIO, Path]:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(
                dir=self.target.parent, prefix=f".{self.target.name}.", suffix=".download"
            )
        except OSError as error:
            raise ModelUnavailable(
                f"cannot write weights into {self.target.parent}: {_reason(error)}"
            ) from None
        self._temp = Path(name)
        self._stream = os.fdopen(fd, "wb")
        return self._stream, self._temp

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        assert self._stream is not None and self._temp is not None
        try:
            if exc_type is None:
                try:
                    self._stream.flush()
                    os.fsync(self._stream.fileno())
                    self._stream.close()
                    os.replace(self._temp, self.target)
                except OSError as error:
                    raise ModelUnavailable(
                        f"cannot write {self.target}: {_reason(error)}"
                    ) from None
                _fsync_directory(self.target.parent)
        finally:
            self._stream.close()
            self._temp.unlink(missing_ok=True)  # gone already after a successful replace


def _write(out: BinaryIO, chunk: bytes, temp: Path) -> None:
    try:
        out.write(chunk)
    except OSError as error:
        raise ModelUnavailable(f"cannot write {temp}: {_reason(error)}") from None


def _content_length(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    try:
        length = int(value) if value is not None else None
    except ValueError:
        return None
    return length if length is not None and length >= 0 else None


def _reason(error: object) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# CLI: `python -m inference weights list|download`
# ---------------------------------------------------------------------------------------------


def add_cli(
    subparsers: argparse._SubParsersAction,  # type: ignore[type-arg]
    *,
    catalogue: Mapping[str, ModelWeights] = CATALOGUE,
) -> argparse.ArgumentParser:
    """Register the `weights` subcommand; handlers are `handler(args, settings) -> int`."""
    weights = subparsers.add_parser(
        "weights", help="list or download model weights", description=__doc__.split("\n")[0]
    )
    weights.add_argument(
        "--weights-dir", type=Path, default=None,
        help="weights directory (default: WEIGHTS_DIR from the settings)",
    )
    commands = weights.add_subparsers(dest="weights_command", metavar="COMMAND", required=True)

    listing = commands.add_parser("list", help="every known weights file and whether it is here")
    listing.add_argument(
        "--verify", action="store_true", help="re-hash present files against their blob ids"
    )
    listing.set_defaults(handler=functools.partial(_list_handler, catalogue=catalogue))

    download = commands.add_parser("download", help="download the weights of models")
    download.add_argument("names", nargs="+", metavar="NAME|all", help="model names, or all")
    download.add_argument(
        "--force", action="store_true", help="download again files that are already present"
    )
    download.set_defaults(handler=functools.partial(_download_handler, catalogue=catalogue))
    return weights


def _store_for(
    args: argparse.Namespace, settings: Settings, catalogue: Mapping[str, ModelWeights]
) -> WeightsStore:
    root = args.weights_dir if args.weights_dir is not None else settings.weights_dir
    return WeightsStore(root, auto_download=True, progress=True, catalogue=catalogue)


def _list_handler(
    args: argparse.Namespace, settings: Settings, *, catalogue: Mapping[str, ModelWeights]
) -> int:
    store = _store_for(args, settings, catalogue)
    rows = [("MODEL", "ROLE", "FILE", "STATE", "SIZE", "BLOB ID", "PATH")]
    statuses = store.status(verify=args.verify)
    for model in statuses:
        for entry in model.files:
            size = tqdm.format_sizeof(entry.size, "B", 1024) if entry.size is not None else "-"
            rows.append(
                (model.name, entry.role, entry.file.relpath, entry.state, size,
                 entry.file.integrity, str(entry.path))
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    print(f"weights directory: {store.root}")
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    corrupt = [f for m in statuses for f in m.files if f.verified is False]
    for entry in corrupt:
        print(f"{entry.path}: {entry.note}", file=sys.stderr)
    return 1 if corrupt else 0


def _download_handler(
    args: argparse.Namespace, settings: Settings, *, catalogue: Mapping[str, ModelWeights]
) -> int:
    from inference.models.classifier import download_torchvision_weights, is_torchvision_classifier

    store = _store_for(args, settings, catalogue)
    names = list(catalogue) if "all" in args.names else list(dict.fromkeys(args.names))
    for name in names:
        if not is_torchvision_classifier(name):
            store.model(name)  # unknown names fail before anything is downloaded
    failures: list[tuple[str, ModelUnavailable]] = []
    for name in names:
        try:
            if is_torchvision_classifier(name):  # torchvision keeps its own cache and hash check
                paths = {"classifier": download_torchvision_weights(name)}
            else:
                paths = store.download_model(name) if args.force else store.ensure_model(name)
        except ModelUnavailable as error:
            failures.append((name, error))
            continue
        for role, path in paths.items():
            print(f"{name} {role}: {path}")
    if len(failures) == 1:
        raise failures[0][1]
    if failures:
        summary = "; ".join(f"{name}: {error}" for name, error in failures)
        raise ModelUnavailable(f"{len(failures)} of {len(names)} downloads failed: {summary}")
    return 0
