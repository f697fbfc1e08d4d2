"""Errors raised deep in `inference/` and turned into words once per front end.

Every error carries a message written for the person who caused it: one line saying what is
wrong and, where there is something to do, what to do.  All positional arguments go through
`Exception.__init__`, so the errors pickle across the worker-process boundary unchanged.
"""

from __future__ import annotations


class InferenceError(Exception):
    """Base class: `str(error)` is the one-line, user-facing message."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class InvalidImage(InferenceError):
    """The bytes are not an image we accept (not an image, truncated, too large, a bomb…)."""


class ModelUnavailable(InferenceError):
    """A model cannot be loaded: unknown name, missing or broken weights."""


class WeightsMissing(ModelUnavailable):
    """A weights file is not on disk and was not (or could not be) downloaded."""

    def __init__(self, message: str, path: str = "", url: str = "") -> None:
        super().__init__(message, path, url)

    @property
    def path(self) -> str:
        return self.args[1]

    @property
    def url(self) -> str:
        return self.args[2]


class WeightsCorrupt(ModelUnavailable):
    """A weights file does not match its published integrity id, or cannot be parsed."""


class CheckpointMismatch(ModelUnavailable):
    """A checkpoint's keys or shapes do not match the architecture it is loaded into."""


class Busy(InferenceError):
    """The queue (or the caller's own share of it) is full; try again later."""

    def __init__(self, message: str, retry_after: float = 5.0) -> None:
        super().__init__(message, retry_after)

    @property
    def retry_after(self) -> float:
        return float(self.args[1])


class RequestTimeout(InferenceError):
    """The request did not finish within its time limit."""


class WorkerCrashed(InferenceError):
    """The worker process running the request died; it is being restarted."""


class ServiceClosed(InferenceError):
    """The service is shutting down (or was never started)."""
