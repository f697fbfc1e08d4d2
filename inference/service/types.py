"""What any inference backend reports, whatever runs its models (worker processes, Ray Serve).

`ModelState`: one task's model and whether it can answer, with the weights files it misses and
the command that gets them.  `TaskStats`: one task's counters and its recent latencies.  Both
are plain values; fields a backend has no notion of keep their defaults.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: How many recent requests the latency percentiles are taken over.
LATENCY_WINDOW = 256


@dataclass(frozen=True)
class MissingWeights:
    """A weights file a model needs and does not have, and how to get it."""

    #: The file's name ("horse2zebra_0.4.0.pth").
    file: str
    #: Where the model looks for it.
    path: str
    #: Where it is published (the parts' URLs, space-separated, for a file joined from parts).
    url: str
    #: The command that downloads it on the machine that runs the model.
    command: str


@dataclass(frozen=True)
class ModelState:
    task: str
    #: The model's name: the configured one until the backend reports what it loaded.
    model: str
    #: "idle" (not loaded) | "loading" | "ready" | "unavailable"
    state: str
    #: What runs it: "onnx" (ONNX Runtime) or "torch"; "" until the backend reports it.
    runtime: str = ""
    #: The device type it runs on ("cpu", "cuda"); "" until known.
    device: str = ""
    #: The weights files it lacks, with the command that gets them; () when complete.
    missing: tuple[MissingWeights, ...] = ()
    #: Why it is unavailable, or what happened last (a crash); "" otherwise.
    error: str = ""
    #: The local backend's worker process; None where there is none (or none running).
    worker_pid: int | None = None

    @property
    def detail(self) -> str:
        """The former name of `error`, kept for callers written before it."""
        return self.error


@dataclass
class TaskStats:
    """One task's counters since the service started.

    The backend keeps one per task and counts into it; `stats()` hands out copies with the live
    figures (`waiting`, `running`, `reserved`, the percentiles) filled in.
    """

    task: str
    #: In line: not taken up by a model yet.
    waiting: int = 0
    #: Taken up (decoding or on the model).
    running: int = 0
    #: Slots reserved (`reserve`) and not used yet.
    reserved: int = 0
    submitted: int = 0
    #: Answered with a result.
    done: int = 0
    #: Answered with an error (a bad image, a crash…), timeouts and cancellations apart.
    failed: int = 0
    timed_out: int = 0
    cancelled: int = 0
    #: Refused with `Busy` (queue full or the user's cap).
    rejected: int = 0
    #: Went through the model (a request cancelled before it started never does).
    ran: int = 0
    #: Latency (submit → result) of the last `LATENCY_WINDOW` answered requests, in ms; 0 before any.
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    # --- backend-specific; a backend that has no such notion leaves the default --------------
    #: Sent to a worker process.
    dispatched: int = 0
    #: Dispatched but dropped by the worker before the model because the caller had gone.
    skipped_in_worker: int = 0
    #: Model batch size → how many batches of that size ran.
    batch_sizes: dict[int, int] = field(default_factory=dict)
    #: Seconds spent in the model (decoding and preprocessing not included).
    model_seconds: float = 0.0
    worker_starts: int = 0
    worker_crashes: int = 0
    worker_pid: int | None = None
    #: Threads its batches hold now out of the service's core budget (`cpu_cores`).
    threads: int = 0
    #: Seconds the worker took from its process start to its model ready (None: not ready yet).
    worker_startup_s: float | None = None
    #: The worker's resident memory when last looked at, and the most seen, in MB.
    worker_memory_mb: float | None = None
    worker_peak_memory_mb: float | None = None
    #: What the worker said it needs with its models loaded (None: not said), and the ceiling
    #: the watchdog holds it to now (0: none; `inference.service.ceilings`), in MB.
    worker_memory_need_mb: float | None = None
    worker_memory_ceiling_mb: int = 0


@dataclass(frozen=True)
class ServiceStats:
    tasks: dict[str, TaskStats]
    #: The cores the workers share (the local backend's budget); 0 where there is none.
    cpu_cores: int = 0

    def __getitem__(self, task: str) -> TaskStats:
        return self.tasks[task]


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (`fraction` in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def missing_weights(weights_dir: Path, models: Iterable[str]) -> dict[str, tuple[MissingWeights, ...]]:
    """Model name → the files of the weights store it lacks.  A model the store does not know
    (a torchvision classifier: torchvision keeps its own cache) misses nothing here.

    Touches the disk (a `stat` per catalogue file): call it off the event loop when the
    weights directory may be slow.
    """
    from inference.weights import DOWNLOAD_COMMAND, WeightsStore  # the store's module is big; load it on use

    wanted = set(models)
    found: dict[str, tuple[MissingWeights, ...]] = {}
    for model in WeightsStore(weights_dir).status():
        if model.name in wanted:
            command = DOWNLOAD_COMMAND.format(name=model.name)
            found[model.name] = tuple(
                MissingWeights(entry.file.name, str(entry.path), " ".join(entry.file.urls), command)
                for entry in model.files
                if not entry.present
            )
    return found
