"""The weights store: catalogue files on disk, downloaded, verified and installed atomically.

`inference.catalogue` names each model's files (where they are published, their integrity ids);
`WeightsStore` maps them to paths under one weights directory, fetches the missing ones on
request and reports their status.  It imports no model code (and no torch): the models use the
store, not the other way round.  The `weights list|download` command is in `inference.cli`.

Integrity: every file the book's repositories publish is checked against its **git blob id**
(what `git hash-object FILE` prints), which catches truncated and tampered downloads without any
hash published elsewhere.  The CycleGAN authors' zoo publishes no id; those downloads are
checked against their Content-Length only, and `status` says so.

Atomicity (`inference.atomic`): a download goes to a hidden temp file in the target's directory,
is fsynced and verified, then `os.replace`d onto the final path.  A half-written, interrupted or corrupt
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

import hashlib
import http.client
import os
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

from tqdm import tqdm

from inference.atomic import AtomicFile, describe_error, write_chunk
from inference.catalogue import ALLOWED_SCHEMES, CATALOGUE, ModelWeights, WeightsFile, check_url
from inference.errors import ModelUnavailable, WeightsCorrupt, WeightsMissing

if TYPE_CHECKING:
    from config import Settings

__all__ = [
    "CATALOGUE",
    "DOWNLOAD_COMMAND",
    "ModelWeights",
    "ModelWeightsStatus",
    "WeightsFile",
    "WeightsFileStatus",
    "WeightsStore",
    "git_blob_id",
]

#: How a person fetches a model's files (the bot and the service show it beside missing files).
DOWNLOAD_COMMAND = "python -m inference weights download {name}"
USER_AGENT = "discord-vision-bot-weights/1.0 (+urllib)"
_CHUNK_BYTES = 1 << 20

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
        if urllib.parse.urlsplit(newurl).scheme not in ALLOWED_SCHEMES:
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
        check_url(file.url)
        request = urllib.request.Request(file.url, headers={"User-Agent": USER_AGENT})
        try:
            return self._opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            error.close()
            raise self._download_failed(file, f"HTTP {error.code} {error.reason}") from None
        except urllib.error.URLError as error:
            raise self._download_failed(file, describe_error(error.reason)) from None
        except (OSError, http.client.HTTPException) as error:
            raise self._download_failed(file, describe_error(error)) from None

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
                        file, f"the connection broke after {received} bytes ({describe_error(error)})"
                    ) from None
                if not chunk:
                    break
                write_chunk(out, chunk, temp)
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
    def _temp_file_for(target: Path) -> AtomicFile:
        return AtomicFile(target)


def _content_length(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    try:
        length = int(value) if value is not None else None
    except ValueError:
        return None
    return length if length is not None and length >= 0 else None
