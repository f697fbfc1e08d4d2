"""The worker process: decode, preprocess and run one task's model, batch after batch.

The service (main process, asyncio) sends *batches* of undecoded image bytes
(`inference.worker.protocol`); the worker decodes, preprocesses, runs the model and sends back
one outcome per request.  A reader thread takes messages off the pipe (a `Cancel` is applied at
once, out of band) and the model's thread works through the batches: load the model once, decode
(+ draft) and preprocess every image of the batch, run the model, send the results.

How decoding meets the model depends on the device; measured with inference/bench.py:
- CPU: the images of a batch are decoded side by side on all cores, *between* model calls.
  Decoding *beside* the model (a pipeline thread) was slower: torch's thread team then shares
  the cores with the decoder, and each of its barriers waits for a descheduled thread.
- GPU: a prepare thread decodes batch N+1 while the GPU runs batch N, so the GPU never waits
  for JPEG decoding.
The worker also keeps freed memory for reuse (`keep_freed_memory`): without it, glibc maps and
unmaps a batch's activations on every forward pass, and batching *lost* throughput on the CPU.

A model that cannot load fails the requests of that batch with its error and is tried again on
the next batch.  One image that cannot be decoded fails only its own request.

Torch is imported when the worker starts, never at import: the parent imports this module to
name `run_worker` as the child's entry point.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from inference.errors import InferenceError, ModelUnavailable
from inference.worker.protocol import (
    Batch,
    BatchHeader,
    Cancel,
    Load,
    Outcome,
    Results,
    Started,
    StateChanged,
    Stop,
    WorkerConfig,
    WorkItem,
    receive_batch,
)

logger = logging.getLogger(__name__)

# --- the worker process ---------------------------------------------------------------------------


def worker_threads(torch_threads: int) -> int:
    """Torch intra-op threads: the configured number (`torch_threads`), else one per core this
    process may use."""
    if torch_threads > 0:
        return torch_threads
    return max(1, len(os.sched_getaffinity(0)))


def run_worker(config: WorkerConfig, conn: Connection) -> None:
    """Entry point of a worker process (started with the "spawn" context)."""
    # Ctrl-C in a terminal reaches the whole process group: let the parent decide and stop us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()
    _Worker(config, conn).serve()
    # Everything is answered.  Skip the interpreter's teardown (torch's takes seconds): the
    # parent waits for this exit when it shuts down.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


#: glibc `mallopt` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations below this come from the heap and are reused, not mapped and unmapped each time.
MMAP_THRESHOLD_BYTES = 128 * 1024 * 1024
#: Freed memory kept for reuse before any is given back to the system.
TRIM_THRESHOLD_BYTES = 512 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Let glibc reuse the model's big activation buffers instead of unmapping them.

    By default glibc serves allocations over a (moving) threshold with fresh `mmap`s and unmaps
    them on free, so every forward pass of a batch faults its activations in page by page again.
    Measured on the 2-core dev machine, EfficientNet-Lite0 per image: batch 1 11 ms, batch 8
    17-19 ms with ~7,000 page faults per image; with these settings batch 8 takes 9 ms and no
    faults.  (The CycleGAN generator at 256×256, batch 4: 477 → 341 ms per image.)  PyTorch's
    CPU tuning guide suggests jemalloc or tcmalloc for the same reason; this needs no extra
    library.  Returns False where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(
            libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        )
    except (OSError, AttributeError):
        return False


@dataclass
class _Prepared:
    batch_id: int
    #: (request id, input tensor, options) of the items ready for the model.
    ready: list[tuple[int, Any, dict[str, Any]]] = field(default_factory=list)
    failed: list[Outcome] = field(default_factory=list)
    skipped: int = 0


class _Worker:
    def __init__(self, config: WorkerConfig, conn: Connection) -> None:
        import torch  # imported here: the parent's copy of this module never needs torch

        from inference.images import ImageLimits
        from inference.registry import resolve_device

        self.task = config.task
        self.config = config
        self.conn = conn
        self.threads = worker_threads(config.torch_threads)
        torch.set_num_threads(self.threads)
        self.device = resolve_device(config.device)
        self.overlap_decoding = self.device.type == "cuda"
        self.limits = ImageLimits(
            max_bytes=config.max_image_bytes,
            max_pixels=config.max_image_pixels,
            max_aspect_ratio=config.max_image_aspect_ratio,
            max_jpeg_scans=config.max_jpeg_scans,
        )
        self.pipeline: Any = None
        self.decoders = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="worker-decode")
        self.inbox: queue.SimpleQueue[Batch | Load | None] = queue.SimpleQueue()
        # GPU only: one batch prepared ahead of the model, no more (bounded memory, and a
        # cancellation that arrives meanwhile still saves the model's time).
        self.prepared: queue.Queue[_Prepared | None] = queue.Queue(maxsize=1)
        self.cancelled: set[int] = set()
        self.cancelled_lock = threading.Lock()
        self.send_lock = threading.Lock()

    # -- threads ----------------------------------------------------------------------------

    def serve(self) -> None:
        threading.Thread(target=self._read_loop, name="worker-reader", daemon=True).start()
        if self.overlap_decoding:
            threading.Thread(target=self._prepare_loop, name="worker-prepare", daemon=True).start()
            while (job := self.prepared.get()) is not None:
                self._run(job)
        else:
            while (message := self.inbox.get()) is not None:
                if (job := self._take(message)) is not None:
                    self._run(job)

    def _read_loop(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the parent is gone: nobody wants our results
                break
            if isinstance(message, Cancel):
                with self.cancelled_lock:
                    self.cancelled.update(message.request_ids)
            elif isinstance(message, BatchHeader):
                try:
                    self.inbox.put(receive_batch(self.conn, message))
                except (EOFError, OSError):
                    break
            elif isinstance(message, Load):
                self.inbox.put(message)
            elif isinstance(message, Stop):
                break
        self.inbox.put(None)

    def _prepare_loop(self) -> None:
        while (message := self.inbox.get()) is not None:
            if (job := self._take(message)) is not None:
                self.prepared.put(job)
        self.prepared.put(None)

    def _take(self, message: Batch | Load) -> _Prepared | None:
        """A batch → its prepared inputs; a `Load` → load the model and report (no job)."""
        if isinstance(message, Batch):
            self._send(Started(message.batch_id))
            return self._prepare(message)
        if self.pipeline is not None:  # already loaded: say so, the caller waits for it
            self._send(self._ready_report())
        else:
            self._ensure_pipeline()
        return None

    # -- stages -----------------------------------------------------------------------------

    def _ensure_pipeline(self) -> InferenceError | None:
        """Load the model once; on failure return the error (and try again next batch)."""
        if self.pipeline is not None:
            return None
        from inference.registry import load_pipeline

        self._send(StateChanged("loading", device=self.device.type))
        try:
            # The loaders take a `Settings`: one made of the config's plain values.
            pipeline = load_pipeline(self.task, self.config.loader_settings(), self.device)
        except InferenceError as error:
            self._send(StateChanged("unavailable", error=str(error)))
            return error
        except Exception as error:  # a bug or an environment problem: keep the details in the log
            logger.exception("loading the %s model failed", self.task)
            error = ModelUnavailable(f"The {self.task} model could not be loaded ({type(error).__name__}: {error}).")
            self._send(StateChanged("unavailable", error=str(error)))
            return error
        self.pipeline = pipeline
        self._send(self._ready_report())
        return None

    def _ready_report(self) -> StateChanged:
        return StateChanged("ready", model=str(getattr(self.pipeline, "name", self.task)), device=self.device.type)

    def _prepare(self, batch: Batch) -> _Prepared:
        prepared = _Prepared(batch.batch_id)
        load_error = self._ensure_pipeline()
        todo = []
        for item in batch.items:
            if self._take_cancelled(item.request_id):
                prepared.skipped += 1
            elif load_error is not None:
                prepared.failed.append(Outcome(item.request_id, error=load_error))
            else:
                todo.append(item)
        # Pillow decodes with the GIL released: the images of a batch decode side by side.
        # Preprocessing (torch ops) stays on this thread: torch ops called from the decoder
        # threads would start thread teams of their own, and with more OpenMP threads than cores
        # the model's team stops spinning and sleeps at every barrier.
        images = self.decoders.map(self._decode, todo) if len(todo) > 1 else map(self._decode, todo)
        for item, image in zip(todo, images):
            outcome = image if isinstance(image, InferenceError) else self._preprocess(image)
            if isinstance(outcome, InferenceError):
                prepared.failed.append(Outcome(item.request_id, error=outcome))
            else:
                prepared.ready.append((item.request_id, outcome, item.options))
        return prepared

    def _decode(self, item: WorkItem) -> Any:
        """One image decoded (RGB, drafted down for the model), or the error to send back."""
        from inference.images import decode_image

        try:
            return decode_image(item.image, self.limits, draft_size=self.pipeline.draft_size)
        except InferenceError as error:
            return error
        except Exception:
            logger.exception("decoding a %s request failed", self.task)
            return InferenceError("That image could not be decoded.")

    def _preprocess(self, image: Any) -> Any:
        try:
            return self.pipeline.preprocess(image)
        except InferenceError as error:
            return error
        except Exception:
            logger.exception("preprocessing a %s request failed", self.task)
            return InferenceError("That image could not be prepared for the model.")

    def _run(self, job: _Prepared) -> None:
        if job.failed:
            self._send(Results(job.batch_id, job.failed))
        skipped = job.skipped
        for chunk in self._chunks(job.ready):
            live = [entry for entry in chunk if not self._take_cancelled(entry[0])]
            skipped += len(chunk) - len(live)
            for results in self._run_model(job.batch_id, live) if live else []:
                self._send(results)
        self._send(Results(job.batch_id, [], final=True, skipped=skipped))
        # Request ids grow batch after batch: a cancellation of an id up to this batch's that
        # was not used came after its result, and will never be.
        newest = max((entry[0] for entry in job.ready), default=0)
        with self.cancelled_lock:
            self.cancelled = {request_id for request_id in self.cancelled if request_id > newest}

    def _chunks(self, ready: list[tuple[int, Any, dict[str, Any]]]) -> list[list[tuple[int, Any, dict[str, Any]]]]:
        """Which inputs go through the model together.

        Equal shapes are stacked when the pipeline says its inputs are all one size (the
        classifier's crops) or on a GPU.  Size-dependent models (CycleGAN at the photo's aspect
        ratio, the captioner) run one input at a time on the CPU: batching gains them nothing
        there (the generator at 256×256 on 2 cores: 316 ms per image alone, 341 ms in a batch
        of 4, even with `keep_freed_memory`), and each result goes back as soon as it exists
        instead of waiting for the rest of the batch.
        """
        if not ready:
            return []
        if not (self.pipeline.fixed_input_size or self.device.type == "cuda"):
            return [[entry] for entry in ready]
        groups: dict[tuple[int, ...], list[tuple[int, Any, dict[str, Any]]]] = {}
        for entry in ready:
            groups.setdefault(tuple(entry[1].shape), []).append(entry)
        return list(groups.values())

    def _run_model(self, batch_id: int, entries: list[tuple[int, Any, dict[str, Any]]]) -> list[Results]:
        started = time.perf_counter()
        try:
            values = self.pipeline.run([tensor for _, tensor, _ in entries], [options for _, _, options in entries])
        except Exception as error:
            if len(entries) > 1:
                # Find the input that breaks the batch: the others still deserve their result.
                return [results for entry in entries for results in self._run_model(batch_id, [entry])]
            if not isinstance(error, InferenceError):
                logger.exception("the %s model failed", self.task)
                error = InferenceError(f"The {self.task} model failed on that image.")
            return [Results(batch_id, [Outcome(entries[0][0], error=error)])]
        seconds = time.perf_counter() - started
        outcomes = [Outcome(request_id, value=value) for (request_id, _, _), value in zip(entries, values)]
        return [Results(batch_id, outcomes, model_batch=len(entries), model_seconds=seconds)]

    # -- helpers ----------------------------------------------------------------------------

    def _take_cancelled(self, request_id: int) -> bool:
        with self.cancelled_lock:
            if request_id in self.cancelled:
                self.cancelled.discard(request_id)
                return True
            return False

    def _send(self, message: StateChanged | Started | Results) -> None:
        with self.send_lock:
            try:
                self.conn.send(message)
            except (OSError, EOFError):  # the parent is gone; the reader thread ends us
                pass
