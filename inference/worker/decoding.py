"""Decoding under a memory budget: what a worker process and a Ray replica share.

A batch's images decode side by side (Pillow releases the GIL), but eight legal 49-megapixel
PNGs at once hold gigabytes, so a worker's memory ceiling could not be sized to its model.
Each image's peak is estimated from its header (`inference.decode_cost`, refused when it
alone is over the budget); a decode starts only when its estimate fits in what the other
decodes of the worker hold (`DecodeBudget`), and its share is freed once the model's input is
made from it and the full-size image is dropped.

No torch and no Pillow at import: the Ray backend's client imports this through its replica.
"""

from __future__ import annotations

import logging
import threading
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from inference.errors import InferenceError

if TYPE_CHECKING:
    from PIL import Image

    from inference.images import ImageLimits

logger = logging.getLogger(__name__)


class DecodeBudget:
    """A semaphore counted in bytes: `acquire(n)` waits until `n` more fit in `total_bytes`.

    `total_bytes` 0 means no limit.  A request larger than the whole budget is never made
    (`open_image` refuses the image); were one made, it would wait for everything else to be
    released and then go alone rather than wait forever.
    """

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes
        self._held = 0
        self._changed = threading.Condition()

    @property
    def held(self) -> int:
        with self._changed:
            return self._held

    def acquire(self, size: int) -> None:
        share = self._share(size)
        with self._changed:
            self._changed.wait_for(lambda: self._held + share <= max(self.total_bytes, share))
            self._held += share

    def release(self, size: int) -> None:
        share = self._share(size)
        with self._changed:
            self._held -= share
            self._changed.notify_all()

    def _share(self, size: int) -> int:
        return 0 if self.total_bytes <= 0 else max(0, size)


@dataclass
class HeldImage:
    """A decoded RGB image and the share of the budget it holds until `prepare_held` frees it."""

    image: Image.Image | None
    held_bytes: int


def decode_held(
    data: bytes, limits: ImageLimits, budget: DecodeBudget, draft_size: tuple[int, int] | None, *, task: str
) -> HeldImage | InferenceError:
    """One image decoded (RGB, drafted down for the model) once its estimate fits in the budget;
    or the error to send back, with nothing held.  Runs on any thread."""
    from inference.images import open_image  # Pillow: only where images are decoded

    try:
        opened = open_image(data, limits, draft_size=draft_size)  # the header only: cheap
    except InferenceError as error:
        return error
    except Exception:
        logger.exception("decoding a %s request failed", task)
        return InferenceError("That image could not be decoded.")
    budget.acquire(opened.decode_bytes)
    try:
        return HeldImage(opened.decode(), opened.decode_bytes)
    except Exception as error:
        budget.release(opened.decode_bytes)
        if isinstance(error, InferenceError):
            return _without_frames(error)
        logger.exception("decoding a %s request failed", task)
        traceback.clear_frames(error.__traceback__)  # a kept log record must not keep the image
        return InferenceError("That image could not be decoded.")


def prepare_held(pipeline: Any, held: HeldImage | InferenceError, budget: DecodeBudget, *, task: str) -> Any:
    """The model's input made from a decoded image (or the error to send back); the image's
    share of the budget is freed once the full-size image is dropped."""
    if isinstance(held, InferenceError):
        return held
    image, held.image = held.image, None  # this frame holds the only reference now
    try:
        return pipeline.preprocess(image)
    except InferenceError as error:
        return _without_frames(error)
    except Exception as error:
        logger.exception("preprocessing a %s request failed", task)
        traceback.clear_frames(error.__traceback__)  # a kept log record must not keep the image
        return InferenceError("That image could not be prepared for the model.")
    finally:
        del image
        budget.release(held.held_bytes)


def prepare_one(
    pipeline: Any, data: bytes, limits: ImageLimits, budget: DecodeBudget, *, task: str
) -> Any:
    """Decode and preprocess one image under the budget, on this thread: the model's input, or
    the `InferenceError` to answer with."""
    held = decode_held(data, limits, budget, pipeline.draft_size, task=task)
    return prepare_held(pipeline, held, budget, task=task)


def _without_frames(error: InferenceError) -> InferenceError:
    """The error without its tracebacks: their frames hold the full-size image, which must go
    when its share of the budget is freed, not when the batch's answers are sent."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__traceback__ = None
        link = link.__cause__ or link.__context__
    return error
