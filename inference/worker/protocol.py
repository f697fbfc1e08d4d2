"""What the service and a worker process say to each other, and how it goes on the pipe.

    main → worker   Batch(batch_id, items) | Cancel(request_ids) | Load() | Stop()
    worker → main   StateChanged(state, model, error, device) | Started(batch_id)
                    | Results(batch_id, outcomes, …, final)

A worker starts with a `WorkerConfig`: the few plain values its task needs, never the whole
`Settings` (which holds the Discord token).  No torch here: the service imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config import Settings
from inference.errors import InferenceError
from inference.tasks import get_task

if TYPE_CHECKING:
    from inference.images import ImageLimits

# --- the worker's configuration --------------------------------------------------------------


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker process reads: plain values, picklable, no secrets."""

    task: str
    #: The model's name (the classifier, the CycleGAN generator, the captioner).
    model: str
    #: "auto" or a torch device string.
    device: str
    #: The service's core budget: the threads the worker uses until a batch brings its own
    #: grant (loading, warm-up); 0 means one per core the process may use.
    cpu_cores: int
    #: INFERENCE_RUNTIME: "auto", "onnx" or "torch" (`inference.runtime.load_for_worker`).
    inference_runtime: str
    # The decoder's limits (`inference.images.ImageLimits`).
    max_image_bytes: int
    max_image_pixels: int
    max_image_aspect_ratio: float
    max_jpeg_scans: int
    decode_memory_mb: int
    # What the model loaders read.
    weights_dir: Path
    auto_download: bool
    trust_hub_repos: bool
    zebra_size: int
    caption_size: int
    caption_beam: int

    @classmethod
    def from_settings(cls, task: str, settings: Settings) -> WorkerConfig:
        return cls(
            task=task,
            model=get_task(task).default_model(settings),
            device=settings.device,
            cpu_cores=settings.cpu_cores,
            inference_runtime=settings.inference_runtime,
            max_image_bytes=settings.max_image_bytes,
            max_image_pixels=settings.max_image_pixels,
            max_image_aspect_ratio=settings.max_image_aspect_ratio,
            max_jpeg_scans=settings.max_jpeg_scans,
            decode_memory_mb=settings.decode_memory_mb,
            weights_dir=settings.weights_dir,
            auto_download=settings.auto_download,
            trust_hub_repos=settings.trust_hub_repos,
            zebra_size=settings.zebra_size,
            caption_size=settings.caption_size,
            caption_beam=settings.caption_beam,
        )

    def image_limits(self) -> ImageLimits:
        """The decoder's limits (`inference.images.decode_image`)."""
        from inference.images import ImageLimits  # Pillow: only where images are decoded

        return ImageLimits(
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_image_pixels,
            max_aspect_ratio=self.max_image_aspect_ratio,
            max_jpeg_scans=self.max_jpeg_scans,
            max_decode_bytes=self.decode_memory_mb * 1024 * 1024,
        )

    def loader_settings(self) -> Settings:
        """A `Settings` for the model loaders (which take one), built from these values only:
        everything else keeps its default, the token stays None."""
        values: dict[str, Any] = dict(
            device=self.device,
            cpu_cores=self.cpu_cores,
            inference_runtime=self.inference_runtime,
            max_image_bytes=self.max_image_bytes,
            max_image_pixels=self.max_image_pixels,
            max_image_aspect_ratio=self.max_image_aspect_ratio,
            max_jpeg_scans=self.max_jpeg_scans,
            decode_memory_mb=self.decode_memory_mb,
            weights_dir=self.weights_dir,
            auto_download=self.auto_download,
            trust_hub_repos=self.trust_hub_repos,
            zebra_size=self.zebra_size,
            caption_size=self.caption_size,
            caption_beam=self.caption_beam,
        )
        setting = get_task(self.task).model_setting
        if setting:  # a task whose model is fixed has no setting to carry it
            values[setting] = self.model
        return Settings(**values)


# --- main → worker ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkItem:
    request_id: int
    image: bytes
    options: dict[str, Any]


@dataclass(frozen=True)
class Batch:
    batch_id: int
    items: list[WorkItem]
    #: The threads the service granted this batch out of its core budget (0: the worker's own).
    threads: int = 0


@dataclass(frozen=True)
class BatchHeader:
    """A `Batch` on the wire: this header, then each item's image as one raw message.

    Pickling would copy every image into one buffer while holding the GIL (8 × 25 MB stalled
    the event loop for 100+ ms); `send_bytes` writes the bytes as they are, GIL released.
    """

    batch_id: int
    #: (request id, options) of each item, in the order their images follow.
    items: list[tuple[int, dict[str, Any]]]
    threads: int = 0


@dataclass(frozen=True)
class Cancel:
    """These requests no longer have a caller: skip them if they have not reached the model."""

    request_ids: list[int]


@dataclass(frozen=True)
class Load:
    """Load the model now (warm-up), without a request."""


@dataclass(frozen=True)
class Stop:
    pass


# --- worker → main ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StateChanged:
    """The worker's model moved on: the service folds this into the task's `ModelState`."""

    #: "loading" | "ready" | "unavailable"
    state: str
    model: str = ""
    #: Why it is unavailable; "" otherwise.
    error: str = ""
    #: The torch device type the worker runs on ("cpu", "cuda"): the task's batch policy.
    device: str = ""
    #: What runs the configured model: "onnx" (ONNX Runtime) or "torch"; "" until loaded.
    runtime: str = ""
    #: On "ready": bytes the worker needs with what it has loaded (resident now, plus what
    #: running its models was measured to take: `ModelShelf.memory_need`); 0: not known.
    memory_need: int = 0


@dataclass(frozen=True)
class Started:
    """The worker has taken up this batch: its requests are no longer waiting in line."""

    batch_id: int


@dataclass(frozen=True)
class Outcome:
    request_id: int
    value: Any = None
    error: InferenceError | None = None


@dataclass(frozen=True)
class Results:
    batch_id: int
    outcomes: list[Outcome]
    #: How many inputs went through the model together for these outcomes (0: none did).
    model_batch: int = 0
    #: Seconds the model took for them.
    model_seconds: float = 0.0
    #: True on the last message of a batch: the worker is done with it.
    final: bool = False
    #: Requests of the batch dropped because they were cancelled before reaching the model.
    skipped: int = 0
    #: On the final message: the threads the batch ran with.
    threads: int = 0


@dataclass(frozen=True)
class Unsendable:
    """Main process only: a message the writer thread could not pickle, and why."""

    batch_id: int | None
    reason: str


# --- the wire ---------------------------------------------------------------------------------


def frames(message: Any) -> list[bytes | memoryview]:
    """What goes on the wire for a message, pickled *before* anything is written: a message
    that cannot be pickled then leaves the pipe as it was (`Connection.send` does the same)."""
    if isinstance(message, Batch):
        header = BatchHeader(message.batch_id, [(item.request_id, item.options) for item in message.items], message.threads)
        return [ForkingPickler.dumps(header), *(item.image for item in message.items)]
    return [ForkingPickler.dumps(message)]


def receive_batch(conn: Connection, header: BatchHeader) -> Batch:
    """The rest of a `Batch` whose header was just received: one raw message per image."""
    items = [WorkItem(request_id, conn.recv_bytes(), options) for request_id, options in header.items]
    return Batch(header.batch_id, items, header.threads)
