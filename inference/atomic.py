"""Atomic file installation: a temp file beside the target, fsynced, then `os.replace`d.

A half-written, interrupted or failed write is never at the target path, and the temp file is
removed on every failure; the weights store installs every download and every join this way.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from inference.errors import ModelUnavailable


class AtomicFile:
    """`with AtomicFile(target) as (stream, temp_path):` — a temp file next to `target` that
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
                f"cannot write weights into {self.target.parent}: {describe_error(error)}"
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
                        f"cannot write {self.target}: {describe_error(error)}"
                    ) from None
                _fsync_directory(self.target.parent)
        finally:
            self._stream.close()
            self._temp.unlink(missing_ok=True)  # gone already after a successful replace


def write_chunk(out: BinaryIO, chunk: bytes, temp: Path) -> None:
    try:
        out.write(chunk)
    except OSError as error:
        raise ModelUnavailable(f"cannot write {temp}: {describe_error(error)}") from None


def describe_error(error: object) -> str:
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
